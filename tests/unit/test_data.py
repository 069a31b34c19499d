"""Tests for lora_ops.data: every kind of bad line, masking, split, hash, prepared round trip."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from lora_ops import data
from lora_ops import prepared as prepared_files
from lora_ops.data import (
    IGNORE_INDEX,
    MAX_LINE_BYTES,
    DataError,
    Example,
    Message,
    TokenizedExample,
)
from lora_ops.errors import InputError
from lora_ops.prepared import EVAL_FILE, MANIFEST_FILE, TRAIN_FILE

END = "<|im_end|>"  # SmolLM2's end-of-turn marker


def chat(i: int) -> dict[str, Any]:
    """A valid one-turn conversation, unique per i."""
    return {
        "messages": [
            {"role": "user", "content": f"What is {i} plus one?"},
            {"role": "assistant", "content": f"It is {i + 1}."},
        ]
    }


def as_line(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def write_lines(tmp_path: Path, lines: list[bytes], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def valid_lines(count: int, start: int = 0) -> list[bytes]:
    return [as_line(chat(i)) for i in range(start, start + count)]


def example(*turns: tuple[data.Role, str], line: int = 1) -> Example:
    return Example(tuple(Message(role=r, content=c) for r, c in turns), line)


def label_runs(tokenizer: PreTrainedTokenizerBase, item: TokenizedExample) -> list[str]:
    """Decode each contiguous run of label tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in item.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [str(tokenizer.decode(run, skip_special_tokens=False)) for run in runs]


# ---------------------------------------------------------------------------- bad lines

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}
SYSTEM = {"role": "system", "content": "be brief"}

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
        as_line({"messages": [USER, ASSISTANT, {"role": "tool", "content": "x"}]}),
        "messages[2].role",
        "unknown role 'tool'",
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
        as_line({"messages": [USER, {**ASSISTANT, "weight": 0}]}),
        "messages[1].weight",
        "unknown key 'weight'",
        id="message-extra-key",
    ),
    pytest.param(
        as_line({"messages": [USER, ASSISTANT], "tools": []}),
        "tools",
        "unknown key 'tools'",
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


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["zero-bytes", "blank-lines"])
def test_empty_file_is_a_file_level_problem(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)

    report = data.validate_file(path)

    assert [(p.line, p.reason) for p in report.problems] == [(None, "the file holds no examples")]
    assert str(report.problems[0]) == f"{path}: the file holds no examples"


def test_too_few_examples_is_a_file_level_problem(tmp_path: Path) -> None:
    path = write_lines(tmp_path, valid_lines(3))

    report = data.validate_file(path, min_examples=10)

    assert len(report.problems) == 1
    assert report.problems[0].line is None
    assert "only 3 valid examples; at least 10" in report.problems[0].reason
    assert data.validate_file(path, min_examples=3).ok


def test_missing_file_raises_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read the file"):
        data.parse_examples(tmp_path / "nope.jsonl")


def test_too_long_example_is_reported_with_its_line(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    lines = valid_lines(12)
    lines[6] = as_line({"prompt": "word " * 200, "completion": "fine"})
    path = write_lines(tmp_path, lines)

    report = data.validate_file(path, tiny_tokenizer, max_seq_len=64)

    assert report.too_long == 1
    assert [p.line for p in report.problems] == [7]
    assert "over max_seq_len 64" in report.problems[0].reason
    assert report.summary()["too_long"] == 1


# ---------------------------------------------------------------------------- valid files


def test_messages_file_passes_with_token_counts(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    lines = valid_lines(11)
    # Ending on a user turn after an assistant turn is accepted (context without loss).
    lines.append(as_line({"messages": [SYSTEM, USER, ASSISTANT, {"role": "user", "content": "k"}]}))
    path = write_lines(tmp_path, lines)

    report = data.validate_file(path, tiny_tokenizer, max_seq_len=512)

    assert report.ok, [str(p) for p in report.problems]
    assert report.examples == 12
    assert len(report.token_counts) == 12
    summary = report.summary()
    assert summary["examples"] == 12
    assert summary["problems"] == 0
    assert summary["too_long"] == 0
    assert summary["tokens_min"] <= summary["tokens_median"] <= summary["tokens_max"] <= 512


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


# ---------------------------------------------------------------------------- masking


def test_single_turn_labels_are_the_assistant_content_and_end_marker(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    item = data.tokenize_example(
        tiny_tokenizer,
        example(("system", "Be terse."), ("user", "Capital of France?"), ("assistant", "Paris.")),
    )

    assert len(item.labels) == len(item.input_ids)
    assert label_runs(tiny_tokenizer, item) == [f"Paris.{END}"]


def test_multi_turn_labels_cover_every_assistant_turn_only(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    ex = example(
        ("user", "Hi there"),
        ("assistant", "Hello! How can I help?"),
        ("user", "Count to three"),
        ("assistant", "One, two, three."),
        ("user", "Thanks"),  # a trailing user turn takes no loss
    )
    item = data.tokenize_example(tiny_tokenizer, ex)

    messages = [{"role": m["role"], "content": m["content"]} for m in ex.messages]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert item.input_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert label_runs(tiny_tokenizer, item) == [
        f"Hello! How can I help?{END}",
        f"One, two, three.{END}",
    ]
    assert item.line == ex.line


def test_masking_follows_another_template(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + "
        "'<|endoftext|>\\n\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
    )

    item = data.tokenize_example(
        tokenizer, example(("user", "a"), ("assistant", "b c"), ("user", "d"), ("assistant", "e"))
    )

    assert label_runs(tokenizer, item) == ["b c<|endoftext|>", "e<|endoftext|>"]


def test_template_without_prefix_property_is_refused(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (  # the message count up front changes with every prefix
        "{{ messages | length }}\n{% for m in messages %}{{ m['content'] + '\\n' }}{% endfor %}"
    )

    with pytest.raises(InputError, match="prefix") as caught:
        data.tokenize_example(tokenizer, example(("user", "a"), ("assistant", "b"), line=7))

    assert (caught.value.line, caught.value.field) == (7, "chat_template")


def test_template_refusal_is_reported_on_its_line(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% if messages | length > 2 %}{{ raise_exception('roles must alternate') }}{% endif %}"
        + tiny_tokenizer.chat_template
    )
    lines = valid_lines(12)
    lines[4] = as_line({"messages": [USER, ASSISTANT, USER, ASSISTANT]})
    path = write_lines(tmp_path, lines)

    report = data.validate_file(path, tokenizer)

    assert [(p.line, p.field) for p in report.problems] == [(5, "chat_template")]
    assert "roles must alternate" in report.problems[0].reason


# ---------------------------------------------------------------------------- split


def make_examples(count: int) -> list[Example]:
    return [
        example(("user", f"question {i}"), ("assistant", f"answer {i}"), line=i + 1)
        for i in range(count)
    ]


def contents(examples: list[Example]) -> set[str]:
    return {e.messages[0]["content"] for e in examples}


def test_split_is_deterministic_and_independent_of_order() -> None:
    examples = make_examples(200)
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)

    train, held_out = data.split_examples(examples, 0.2)
    train_again, held_out_again = data.split_examples(examples, 0.2)
    train_shuffled, held_out_shuffled = data.split_examples(shuffled, 0.2)

    assert (train, held_out) == (train_again, held_out_again)
    assert contents(held_out_shuffled) == contents(held_out)
    assert contents(train_shuffled) == contents(train)
    assert [e.line for e in train] == sorted(e.line for e in train)  # input order kept
    # Adding examples never moves existing ones.
    _, held_out_more = data.split_examples(make_examples(300), 0.2)
    assert contents(held_out) <= contents(held_out_more)


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_split_roughly_respects_the_eval_fraction(fraction: float) -> None:
    train, held_out = data.split_examples(make_examples(2000), fraction)

    assert len(train) + len(held_out) == 2000
    assert abs(len(held_out) / 2000 - fraction) < 0.03


def test_split_keeps_at_least_one_example_each_side() -> None:
    two = make_examples(2)
    assert [len(side) for side in data.split_examples(two, 0.0001)] == [1, 1]
    assert [len(side) for side in data.split_examples(two, 0.9999)] == [1, 1]
    assert data.split_examples(two[:1], 0.5) == (two[:1], [])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_refuses_a_bad_fraction(fraction: float) -> None:
    with pytest.raises(InputError) as caught:
        data.split_examples(make_examples(4), fraction)
    assert caught.value.field == "eval_fraction"


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


# ---------------------------------------------------------------------------- prepare


@pytest.fixture
def prepared(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> data.PreparedDataset:
    path = write_lines(tmp_path, valid_lines(30), "customer.jsonl")
    return data.prepare_dataset(path, tiny_tokenizer, max_seq_len=128, eval_fraction=0.2)


def test_prepare_dataset_splits_and_records_its_source(
    tmp_path: Path, prepared: data.PreparedDataset
) -> None:
    path = tmp_path / "customer.jsonl"

    assert len(prepared.train) + len(prepared.eval) == 30
    assert prepared.eval
    assert prepared.train
    assert {t.line for t in prepared.train}.isdisjoint(t.line for t in prepared.eval)
    assert prepared.sha256 == data.dataset_sha256(path)
    assert (prepared.source, prepared.max_seq_len) == (str(path), 128)
    assert all(len(t.input_ids) == len(t.labels) <= 128 for t in prepared.train + prepared.eval)


def test_prepare_dataset_raises_listing_too_long_and_bad_lines(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    lines = valid_lines(12)
    lines[2] = as_line({"prompt": "long " * 300, "completion": "ok"})
    lines[9] = b"{"
    path = write_lines(tmp_path, lines)

    with pytest.raises(DataError) as caught:
        data.prepare_dataset(path, tiny_tokenizer, max_seq_len=100)

    assert [p.line for p in caught.value.problems] == [3, 10]
    assert f"{path}:3: " in str(caught.value)
    assert "over max_seq_len 100" in str(caught.value)


def test_prepare_dataset_refuses_a_bad_fraction_before_reading(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    with pytest.raises(InputError, match="eval_fraction"):
        data.prepare_dataset(tmp_path / "missing.jsonl", tiny_tokenizer, eval_fraction=1.0)


# ---------------------------------------------------------------------------- save and load


def test_save_then_load_round_trips(tmp_path: Path, prepared: data.PreparedDataset) -> None:
    folder = tmp_path / "prepared"

    prepared_files.save_prepared(prepared, folder)
    prepared_files.save_prepared(prepared, folder)  # overwriting in place is fine

    assert prepared_files.load_prepared(folder) == prepared
    assert sorted(p.name for p in folder.iterdir()) == [EVAL_FILE, MANIFEST_FILE, TRAIN_FILE]
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["sha256"] == prepared.sha256
    assert manifest["sizes"] == {"train": len(prepared.train), "eval": len(prepared.eval)}


def _rewrite_line(path: Path, number: int, edit: Any) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


def _edit_row(change: dict[str, Any]) -> Any:
    return lambda line: json.dumps({**json.loads(line), **change})


def _shift_first_token(line: str) -> str:
    row = json.loads(line)
    row["input_ids"][0] += 1  # still well formed: only the checksum can tell
    return json.dumps(row, separators=(",", ":"))


# (file to corrupt, line to corrupt or None for the whole file, how, expected line, phrase)
CORRUPTIONS = [
    pytest.param(TRAIN_FILE, 2, lambda _: "{oops", 2, "not valid JSON", id="train-bad-json"),
    pytest.param(
        TRAIN_FILE, 1, _edit_row({"labels": [1, 2]}), 1, "as long as input_ids", id="labels-short"
    ),
    pytest.param(
        EVAL_FILE, 1, _edit_row({"input_ids": "x"}), 1, "list of token ids", id="ids-not-list"
    ),
    pytest.param(TRAIN_FILE, 1, _edit_row({"extra": 1}), 1, "exactly 'line'", id="extra-key"),
    pytest.param(TRAIN_FILE, 3, _shift_first_token, None, "do not match the sha256", id="checksum"),
    pytest.param(
        MANIFEST_FILE,
        None,
        lambda text: text.replace('"format": 1', '"format": 9'),
        None,
        "format 9",
        id="manifest-format",
    ),
    pytest.param(
        MANIFEST_FILE, None, lambda text: text[:-5], None, "not valid JSON", id="manifest-cut"
    ),
]


@pytest.mark.parametrize(("name", "number", "edit", "line", "phrase"), CORRUPTIONS)
def test_load_prepared_rejects_a_corrupted_file(
    tmp_path: Path,
    prepared: data.PreparedDataset,
    name: str,
    number: int | None,
    edit: Any,
    line: int | None,
    phrase: str,
) -> None:
    folder = tmp_path / "prepared"
    prepared_files.save_prepared(prepared, folder)
    target = folder / name
    if number is None:
        target.write_text(edit(target.read_text()))
    else:
        _rewrite_line(target, number, edit)

    with pytest.raises(InputError) as caught:
        prepared_files.load_prepared(folder)

    assert caught.value.file == str(target)
    if line is not None:
        assert caught.value.line == line
    assert phrase in caught.value.reason


def test_load_prepared_without_manifest(tmp_path: Path, prepared: data.PreparedDataset) -> None:
    folder = tmp_path / "prepared"
    prepared_files.save_prepared(prepared, folder)
    (folder / MANIFEST_FILE).unlink()

    with pytest.raises(InputError, match="cannot read the manifest"):
        prepared_files.load_prepared(folder)
