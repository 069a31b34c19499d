"""Tests for lora_ops.data.tokenize: loss on assistant turns only, under any prefix template."""

from __future__ import annotations

import copy

import pytest
from transformers import PreTrainedTokenizerBase

from lora_ops import data
from lora_ops.errors import InputError
from tests.unit.data.samples import END, example, label_runs


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
