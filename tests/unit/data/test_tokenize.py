"""Tests for lora_ops.data.tokenize: loss on assistant turns only, under any prefix template."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from lora_ops import data
from lora_ops.errors import InputError
from tests.unit.data.samples import END, as_line, example, label_runs, tool_chat, write_lines

SAMPLE = Path(__file__).parents[3] / "examples" / "acme-support.jsonl"


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


def _old_tokenization(
    tokenizer: PreTrainedTokenizerBase, ex: data.Example
) -> tuple[list[int], list[int]]:
    """Ids and labels as tokenize_example made them before tools: apply_chat_template alone."""
    messages = [{"role": m["role"], "content": m["content"]} for m in ex.messages]

    def render(count: int, generation_prompt: bool = False) -> str:
        text = tokenizer.apply_chat_template(
            messages[:count], tokenize=False, add_generation_prompt=generation_prompt
        )
        assert isinstance(text, str)
        return text

    spans = [
        (len(render(i, generation_prompt=True)), len(render(i + 1).rstrip()))
        for i, m in enumerate(messages)
        if m["role"] == "assistant"
    ]
    encoding = tokenizer(
        render(len(messages)), add_special_tokens=False, return_offsets_mapping=True
    )
    ids = list(encoding["input_ids"])
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else data.IGNORE_INDEX
        for token, (start, _) in zip(ids, encoding["offset_mapping"], strict=True)
    ]
    return ids, labels


def test_plain_conversations_tokenize_as_the_template_alone(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    examples = data.read_examples(SAMPLE)
    two_turn = [e for e in examples if len(e.messages) > 3][:10]
    for ex in examples[:30] + two_turn:
        item = data.tokenize_example(tiny_tokenizer, ex)
        assert (item.input_ids, item.labels) == _old_tokenization(tiny_tokenizer, ex), ex.line


def _read_one(tmp_path: Path, obj: dict[str, Any]) -> data.Example:
    (ex,) = data.read_examples(write_lines(tmp_path, [as_line(obj)]))
    return ex


CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "City0"}}\n</tool_call>'


def test_tool_call_turns_are_targets_as_rendered(
    tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    item = data.tokenize_example(tiny_tokenizer, _read_one(tmp_path, tool_chat(0)))

    text = tiny_tokenizer.decode(item.input_ids)
    assert "<tools>" in text  # the functions are offered in the system turn
    assert '<tool_response>\n{"temp": 18}\n</tool_response>' in text
    assert label_runs(tiny_tokenizer, item) == [
        f"{CALL_TEXT}{END}",
        f"It is 18 degrees in City0.{END}",
    ]


@pytest.mark.parametrize("turn", [1, 3], ids=["call-turn", "answer-turn"])
def test_turns_of_weight_zero_carry_no_labels(
    tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path, turn: int
) -> None:
    obj = tool_chat(0)
    obj["messages"][turn]["weight"] = 0
    whole = data.tokenize_example(tiny_tokenizer, _read_one(tmp_path, tool_chat(0)))

    item = data.tokenize_example(tiny_tokenizer, _read_one(tmp_path, obj))

    assert item.input_ids == whole.input_ids  # the turn is still there, as context
    expected = [f"{CALL_TEXT}{END}", f"It is 18 degrees in City0.{END}"]
    del expected[0 if turn == 1 else 1]
    assert label_runs(tiny_tokenizer, item) == expected


def test_weight_zero_on_a_plain_turn(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    turns = example(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")).messages
    skipped = data.Message(role="assistant", content="b", weight=0)
    ex = data.Example((turns[0], skipped, *turns[2:]), line=1)

    assert label_runs(tiny_tokenizer, data.tokenize_example(tiny_tokenizer, ex)) == [f"d{END}"]


def test_masking_follows_a_template_that_takes_tools(
    tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% if tools %}{{ 'tools: ' + (tools | map(attribute='function.name') | join(',')) "
        "+ '\\n' }}{% endif %}"
        "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' }}"
        "{% if m.tool_calls %}{% for c in m.tool_calls %}"
        "{{ 'call ' + c.function.name + ' ' + (c.function.arguments | tojson) }}{% endfor %}"
        "{% else %}{{ m['content'] }}{% endif %}{{ '<|endoftext|>\\n\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
    )

    item = data.tokenize_example(tokenizer, _read_one(tmp_path, tool_chat(0)))

    assert tokenizer.decode(item.input_ids).startswith("tools: get_weather\n")
    assert label_runs(tokenizer, item) == [
        'call get_weather {"city": "City0"}<|endoftext|>',
        "It is 18 degrees in City0.<|endoftext|>",
    ]
