"""Tokenizing an example: the chat template rendered, and loss masked to the assistant's turns.

Loss is taken on assistant turns only: each turn's content and the end-of-turn marker the
chat template writes after it (``<|im_end|>`` for ChatML), found by rendering prefixes of
the conversation, so any template whose prefix renderings are prefixes of the whole works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_ops.data.examples import Example
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
    """Render one conversation with the chat template, tokenize it and mask non-assistant text.

    A token is a target when it starts inside an assistant span (the turn's content and the
    end-of-turn marker after it). A token straddling a span's start is left out: generation
    starts exactly there, so the model never emits it. One straddling its end is kept: the
    model must learn to emit the whole marker.

    Raises:
        InputError: The tokenizer is not a fast one, or its chat template refuses the
            conversation, does not render prefixes as prefixes, or leaves no assistant token.
    """
    if not tokenizer.is_fast:
        raise InputError("a fast tokenizer is needed (for offsets)", field="tokenizer")
    messages = [{"role": m["role"], "content": m["content"]} for m in example.messages]
    text = _render(tokenizer, messages, example.line)
    spans = _assistant_spans(tokenizer, messages, text, example.line)
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
    messages: list[dict[str, str]],
    line: int,
    generation_prompt: bool = False,
) -> str:
    # Imported here, not at the top: holding a tokenizer means transformers' tokenizer module,
    # which imports jinja2, is loaded already; checking structure alone (``data validate``
    # without --base) then never pays for jinja2 (~15 ms of the package's import).
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError as e:
        reason = f"the chat template refused this conversation: {e}"
        raise InputError(reason, line=line, field="chat_template") from e
    if not isinstance(text, str):
        raise InputError("the chat template did not render text", line=line, field="chat_template")
    return text


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], text: str, line: int
) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant turn in ``text``.

    start: the end of messages[:i] rendered with the generation prompt; end: the end of
    messages[:i+1] rendered, less trailing whitespace (the newline after ``<|im_end|>`` is
    layout between turns, not something the model must say).
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], line, generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], line)
        if not (text.startswith(before) and text.startswith(through)):
            reason = (
                f"the chat template does not render messages[:{i}] as a prefix of the whole "
                "conversation, so assistant turns cannot be located for loss masking"
            )
            raise InputError(reason, line=line, field="chat_template")
        spans.append((len(before), len(through.rstrip())))
    return spans
