"""Held-out loss and perplexity, and greedy generations for people to read."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lora_ops.base_models import autocast_for
from lora_ops.chat import encode_chat_ids, text_of
from lora_ops.generation import GenerationRequest, SamplingParams, generate_batch, generate_reply
from lora_ops.lora import adapters_in_use
from lora_ops.training import distributed
from lora_ops.training.batching import Tokenized, collate, count_loss_tokens, summed_nll


def eval_loss(
    model: PreTrainedModel, examples: Sequence[Tokenized], pad_id: int, batch_size: int = 8
) -> float:
    """Mean next-token loss over every labelled token of ``examples`` (token-weighted)."""
    tokens = _labelled_tokens(examples)
    starts = range(0, len(examples), batch_size)
    return _summed_loss(model, examples, pad_id, batch_size, starts) / tokens


def eval_loss_across_ranks(
    model: PreTrainedModel, examples: Sequence[Tokenized], pad_id: int, batch_size: int = 8
) -> float:
    """``eval_loss`` with its batches shared out among the data-parallel ranks.

    Every rank must call it; each gets rank 0's figure, so decisions taken on it (the best
    step, early stopping) agree everywhere. The batches are those ``eval_loss`` makes, so
    one process measures the same loss either way.
    """
    tokens = _labelled_tokens(examples)
    starts = distributed.share(range(0, len(examples), batch_size))
    summed = distributed.sum_value(_summed_loss(model, examples, pad_id, batch_size, starts))
    return distributed.from_main(summed / tokens)


def _labelled_tokens(examples: Sequence[Tokenized]) -> int:
    tokens = count_loss_tokens(examples)
    if tokens == 0:
        raise ValueError("the evaluation examples hold no labelled tokens")
    return tokens


@torch.no_grad()
def _summed_loss(
    model: PreTrainedModel,
    examples: Sequence[Tokenized],
    pad_id: int,
    batch_size: int,
    starts: Iterable[int],
) -> float:
    """Summed next-token loss of the batches of ``examples`` that begin at ``starts``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in starts:
            batch = collate(examples[start : start + batch_size], pad_id, device)
            with autocast_for(device):
                total += summed_nll(model, batch).item()
    finally:
        model.train(was_training)
    return total


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: exp overflows for a diverged run


@dataclass(frozen=True)
class Evaluation:
    """Held-out figures of the base, a candidate adapter and (if any) production."""

    base_loss: float
    candidate_loss: float
    production_loss: float | None
    generations: list[dict[str, str]]


def evaluate_adapters(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_examples: Sequence[Tokenized],
    prompts: Sequence[Sequence[Mapping[str, Any]]],
    *,
    has_production: bool,
    batch_size: int = 8,
    max_new_tokens: int = 48,
    tools: Sequence[Sequence[Mapping[str, Any]]] | None = None,
) -> Evaluation:
    """Measure ``model``'s base and its ``candidate`` (and ``production``) adapters.

    The adapters are already loaded on ``model`` under those names; one copy of the base
    serves all three, switched per call. ``tools[i]`` (when given) are the functions offered
    with ``prompts[i]``, as the example they come from offered them.
    """
    pad_id = int(tokenizer.pad_token_id)
    losses: dict[str | None, float] = {}
    for adapter in (None, "candidate", "production" if has_production else None):
        if adapter in losses:
            continue
        with adapters_in_use(model, adapter):
            losses[adapter] = eval_loss(model, eval_examples, pad_id, batch_size)
    generations = []
    for i, messages in enumerate(prompts):
        offered = tools[i] if tools else ()
        row = {"prompt": text_of(messages[-1].get("content"))}
        for column, adapter in (("base", None), ("candidate", "candidate")):
            row[column] = _reply(model, tokenizer, messages, offered, max_new_tokens, adapter)
        generations.append(row)
    return Evaluation(
        base_loss=losses[None],
        candidate_loss=losses["candidate"],
        production_loss=losses.get("production"),
        generations=generations,
    )


def _reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]],
    max_new_tokens: int,
    adapter: str | None,
) -> str:
    """The greedy reply, rendered as training rendered it when tools or tool turns are in."""
    if not tools and all(set(m) <= {"role", "content"} for m in messages):
        return generate_reply(
            model, tokenizer, [dict(m) for m in messages], max_new_tokens, adapter
        )
    ids = encode_chat_ids(tokenizer, messages, tools)
    request = GenerationRequest(ids, adapter, SamplingParams(max_tokens=max_new_tokens))
    (result,) = generate_batch(model, tokenizer, [request])
    return result.text.strip()
