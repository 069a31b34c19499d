"""Tests for lora_ops.data.examples: every kind of bad line, file:line errors, the content hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_ops import data
from lora_ops.data import MAX_LINE_BYTES, DataError
from lora_ops.errors import InputError
from tests.unit.data.samples import (
    ASSISTANT,
    SYSTEM,
    USER,
    as_line,
    chat,
    example,
    valid_lines,
    write_lines,
)

# ---------------------------------------------------------------------------- bad lines

# (bad line, field, key phrase of the reason); the line is written as line 3 of a good file.
BAD_LINES = [
    pytest.param(b'{"messages": [', None, "not valid JSON", id="bad-json"),
    pytest.param(b"[" * 100_000, None, "nested too deeply", id="json-nested-too-deeply"),
    pytest.param(
        b'{"prompt": "caf\xe9", "completion": "ok"}', None, "not valid UTF-8", id="not-utf8"
    ),
    pytest.param(as_line([USER, ASSISTANT]), None, "expected a JSON object", id="not-an-object"),
    pytest.param(as_line("hello"), None, "got a string", id="json-string"),
    pytest.param(as_line({"text": "hi"}), None, "expected a 'messages' list", id="no-known-shape"),
    pytest.param(as_line({"messages": "hi"}), "messages", "must be a list", id="messages-not-list"),
    pytest.param(as_line({"messages": []}), "messages", "holds no messages", id="messages-empty"),
    pytest.param(
        as_line({"messages": ["hi", ASSISTANT]}),
        "messages[0]",
        "must be an object",
        id="message-not-object",
    ),
    pytest.param(
        as_line({"messages": [{"content": "hi"}, ASSISTANT]}),
        "messages[0].role",
        "missing key 'role'",
        id="missing-role",
    ),
    pytest.param(
        as_line({"messages": [USER, {"role": "assistant"}]}),
        "messages[1].content",
        "missing key 'content'",
        id="missing-content",
    ),
    pytest.param(
        as_line({"messages": [USER, {"role": "assistant", "content": 5}]}),
        "messages[1].content",
        "must be a string, got a number",
        id="content-not-string",
    ),
    pytest.param(
        as_line({"messages": [{"role": "user", "content": [{"type": "text"}]}, ASSISTANT]}),
        "messages[0].content",
        "must be a string, got an array",
        id="content-parts-list",
    ),
    pytest.param(
        as_line({"messages": [USER, ASSISTANT, {"role": "robot", "content": "x"}]}),
        "messages[2].role",
        "unknown role 'robot'",
        id="unknown-role",
    ),
    pytest.param(
        as_line({"messages": [USER, {"role": "assistant", "content": ""}]}),
        "messages[1].content",
        "empty or whitespace-only",
        id="empty-content",
    ),
    pytest.param(
        as_line({"messages": [{"role": "user", "content": " \n\t"}, ASSISTANT]}),
        "messages[0].content",
        "empty or whitespace-only",
        id="whitespace-content",
    ),
    pytest.param(
        b'{"messages": [{"role": "user", "content": "\\ud800"}, '
        b'{"role": "assistant", "content": "ok"}]}',
        "messages[0].content",
        "unpaired surrogate",
        id="lone-surrogate",
    ),
    pytest.param(
        as_line({"messages": [USER, {**ASSISTANT, "name": "bob"}]}),
        "messages[1].name",
        "unknown key 'name'",
        id="message-extra-key",
    ),
    pytest.param(
        as_line({"messages": [USER, ASSISTANT], "metadata": {}}),
        "metadata",
        "unknown key 'metadata'",
        id="line-extra-key",
    ),
    pytest.param(
        as_line({"messages": [USER, ASSISTANT], "prompt": "x"}),
        "prompt",
        "unknown key 'prompt'",
        id="both-shapes",
    ),
    pytest.param(as_line({"messages": [USER]}), "messages", "no assistant turn", id="no-assistant"),
    pytest.param(
        as_line({"messages": [SYSTEM, USER]}), "messages", "no assistant turn", id="system-user"
    ),
    pytest.param(
        as_line({"messages": [USER, SYSTEM, ASSISTANT]}),
        "messages[1].role",
        "system message must come first",
        id="system-not-first",
    ),
    pytest.param(
        as_line({"messages": [SYSTEM, ASSISTANT, USER]}),
        "messages[1].role",
        "must start with a user turn",
        id="assistant-first",
    ),
    pytest.param(
        as_line({"prompt": "hi"}), "completion", "missing key 'completion'", id="no-completion"
    ),
    pytest.param(as_line({"completion": "hi"}), "prompt", "missing key 'prompt'", id="no-prompt"),
    pytest.param(
        as_line({"prompt": 1, "completion": "x"}), "prompt", "must be a string", id="prompt-number"
    ),
    pytest.param(
        as_line({"prompt": "x", "completion": "  "}),
        "completion",
        "empty or whitespace-only",
        id="completion-blank",
    ),
    pytest.param(
        # Line 1 reformatted: other spacing and key order are still the same content.
        b'{"messages":[{"content":"What is 0 plus one?","role":"user"},'
        b'{"content":"It is 1.","role":"assistant"}]}',
        None,
        "exact duplicate of line 1",
        id="duplicate",
    ),
    pytest.param(
        b'{"prompt": "' + b"a" * MAX_LINE_BYTES + b'", "completion": "x"}',
        None,
        f"longer than {MAX_LINE_BYTES} bytes",
        id="huge-line",
    ),
]


@pytest.mark.parametrize(("bad", "field", "phrase"), BAD_LINES)
def test_bad_line_is_reported_with_file_line_field(
    tmp_path: Path, bad: bytes, field: str | None, phrase: str
) -> None:
    lines = valid_lines(2) + [bad] + valid_lines(10, start=2)
    path = write_lines(tmp_path, lines)

    examples, problems = data.parse_examples(path)

    assert len(problems) == 1, [str(p) for p in problems]
    problem = problems[0]
    assert (problem.file, problem.line, problem.field) == (str(path), 3, field)
    assert phrase in problem.reason
    assert str(problem).startswith(f"{path}:3: ")
    assert [e.line for e in examples] == [1, 2, *range(4, 14)]  # the others still read


def test_several_problems_in_one_file_are_all_reported(tmp_path: Path) -> None:
    lines = valid_lines(12)
    lines[1] = b"{not json"
    lines[4] = as_line({"messages": [{"role": "robot", "content": ""}, ASSISTANT]})
    lines[6] = as_line({"messages": [USER]})
    lines[8] = lines[0]
    path = write_lines(tmp_path, lines)

    _, problems = data.parse_examples(path)
    with pytest.raises(DataError) as caught:
        data.read_examples(path)

    where = [(p.line, p.field) for p in problems]
    assert where == [
        (2, None),
        (5, "messages[0].role"),
        (5, "messages[0].content"),
        (7, "messages"),
        (9, None),
    ]
    assert [str(p) for p in caught.value.problems] == [str(p) for p in problems]
    message = str(caught.value)
    assert message.startswith(f"{path}: 5 problems:")
    for line in (2, 5, 7, 9):
        assert f"{path}:{line}: " in message


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([as_line(chat(0)), b"", b"   ", b"oops", as_line(chat(1))]))

    examples, problems = data.parse_examples(path)

    assert [e.line for e in examples] == [1, 5]
    assert [p.line for p in problems] == [4]


def test_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(valid_lines(3)) + b"\r\n")

    examples, problems = data.parse_examples(path)

    assert problems == []
    assert examples[0].messages[1]["content"] == "It is 1."


def test_missing_file_raises_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read the file"):
        data.parse_examples(tmp_path / "nope.jsonl")


def test_prompt_completion_file_passes(tmp_path: Path) -> None:
    lines = [as_line({"prompt": f"Say {i}", "completion": f"{i}"}) for i in range(10)]
    path = write_lines(tmp_path, lines)

    examples = data.read_examples(path)

    assert len(examples) == 10
    assert examples[3].messages == (
        {"role": "user", "content": "Say 3"},
        {"role": "assistant", "content": "3"},
    )
    assert data.validate_file(path).summary()["tokens_median"] is None  # no tokenizer given


def test_prompt_is_the_turns_before_the_first_reply() -> None:
    ex = example(
        ("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2")
    )

    assert data.prompt_of(ex) == list(ex.messages[:2])
    assert data.reference_reply(ex) == "a1"


# ---------------------------------------------------------------------------- content hash


def test_dataset_sha256_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    objects = [chat(i) for i in range(10)]
    base = data.dataset_sha256(write_lines(tmp_path, [as_line(o) for o in objects], "a.jsonl"))

    reformatted = [
        json.dumps(o, indent=None, separators=(",", ":"), sort_keys=True) for o in objects
    ]
    spaced = write_lines(tmp_path, [b"", *(line.encode() for line in reformatted)], "b.jsonl")
    as_prompt = [
        as_line({"completion": o["messages"][1]["content"], "prompt": o["messages"][0]["content"]})
        for o in objects
    ]
    changed = [as_line(o) for o in objects]
    changed[4] = changed[4].replace(b"It is 5.", b"It is 5!")

    assert len(base) == 64
    assert data.dataset_sha256(tmp_path / "a.jsonl") == base
    assert data.dataset_sha256(spaced) == base
    assert data.dataset_sha256(write_lines(tmp_path, as_prompt, "c.jsonl")) == base
    assert data.dataset_sha256(write_lines(tmp_path, changed, "d.jsonl")) != base
    swapped = [as_line(o) for o in objects[1::-1] + objects[2:]]
    assert data.dataset_sha256(write_lines(tmp_path, swapped, "e.jsonl")) != base


def test_dataset_sha256_refuses_a_bad_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=":2: "):
        data.dataset_sha256(write_lines(tmp_path, [as_line(chat(0)), b"{"]))
