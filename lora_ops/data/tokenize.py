"""Tokenizing an example: the chat rendered, and loss masked to the assistant's trained turns.

The conversation is rendered by :func:`lora_ops.chat.render_chat`, tools and tool turns
included (through the base's template, in the ``<tool_call>`` form when the template takes
no tools), so training writes what serving will. Loss is taken on assistant turns whose
weight is not 0: each turn's text (its calls' text, for a turn that calls tools) and the
end-of-turn marker the template writes after it (``<|im_end|>`` for ChatML), found by
rendering prefixes of the conversation, so any template whose prefix renderings are
prefixes of the whole works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_ops.chat import render_chat
from lora_ops.data.examples import Example, is_trained
from lora_ops.errors import InputError

if TYPE_CHECKING:  # only for hints: importing this module stays cheap (CLI start-up)
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label transformers' loss functions skip


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels of one example; ``labels`` is -100 where no loss is taken.

    Labels are not shifted: transformers' causal-LM loss shifts them itself.
    """

    input_ids: list[int]  # (seq,)
    labels: list[int]  # (seq,)
    line: int


def tokenize_example(tokenizer: PreTrainedTokenizerBase, example: Example) -> TokenizedExample:
    """Render one conversation with the chat template, tokenize it and mask untrained text.

    A token is a target when it starts inside a trained assistant span (the turn's text and
    the end-of-turn marker after it). A token straddling a span's start is left out:
    generation starts exactly there, so the model never emits it. One straddling its end is
    kept: the model must learn to emit the whole marker.

    Raises:
        InputError: The tokenizer is not a fast one, or its chat template refuses the
            conversation, does not render prefixes as prefixes, or leaves no assistant token.
    """
    if not tokenizer.is_fast:
        raise InputError("a fast tokenizer is needed (for offsets)", field="tokenizer")
    text = _render(tokenizer, example, len(example.messages))
    spans = _assistant_spans(tokenizer, example, text)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for token, (start, _) in zip(input_ids, encoding["offset_mapping"], strict=True)
    ]
    if all(label == IGNORE_INDEX for label in labels):
        reason = "the chat template left no assistant token to learn from"
        raise InputError(reason, line=example.line, field="chat_template")
    return TokenizedExample(input_ids=input_ids, labels=labels, line=example.line)


def _render(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    count: int,
    generation_prompt: bool = False,
) -> str:
    """The first ``count`` messages of ``example`` rendered, with its tools."""
    messages: Sequence[Mapping[str, Any]] = example.messages[:count]
    try:
        return render_chat(
            tokenizer, messages, example.tools or None, add_generation_prompt=generation_prompt
        )
    except InputError as e:  # raised without a line: this example's
        raise InputError(e.reason, line=example.line, field="chat_template") from e


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase, example: Example, text: str
) -> list[tuple[int, int]]:
    """Character spans [start, end) of each trained assistant turn in ``text``.

    start: the end of messages[:i] rendered with the generation prompt; end: the end of
    messages[:i+1] rendered, less trailing whitespace (the newline after ``<|im_end|>`` is
    layout between turns, not something the model must say).
    """
    spans = []
    for i, message in enumerate(example.messages):
        if not is_trained(message):
            continue
        before = _render(tokenizer, example, i, generation_prompt=True)
        through = _render(tokenizer, example, i + 1)
        if not (text.startswith(before) and text.startswith(through)):
            reason = (
                f"the chat template does not render messages[:{i}] as a prefix of the whole "
                "conversation, so assistant turns cannot be located for loss masking"
            )
            raise InputError(reason, line=example.line, field="chat_template")
        spans.append((len(before), len(through.rstrip())))
    return spans
