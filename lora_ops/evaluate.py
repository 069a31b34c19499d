"""Held-out loss and perplexity, and greedy generations for people to read."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lora_ops.base_models import autocast_for
from lora_ops.batching import Tokenized, collate, count_loss_tokens, summed_nll
from lora_ops.defaults import DEFAULT_GATE
from lora_ops.generation import generate_reply
from lora_ops.lora import adapters_in_use


@torch.no_grad()
def eval_loss(
    model: PreTrainedModel, examples: Sequence[Tokenized], pad_id: int, batch_size: int = 8
) -> float:
    """Mean next-token loss over every labelled token of ``examples`` (token-weighted)."""
    tokens = count_loss_tokens(examples)
    if tokens == 0:
        raise ValueError("the evaluation examples hold no labelled tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id, device)
            with autocast_for(device):
                total += summed_nll(model, batch).item()
    finally:
        model.train(was_training)
    return total / tokens


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: exp overflows for a diverged run


@torch.no_grad()
@dataclass(frozen=True)
class GateDecision:
    """Whether a candidate adapter may be registered, with the figures behind it."""

    passed: bool
    reason: str
    base_loss: float
    candidate_loss: float
    production_loss: float | None
    min_improvement: float
    production_tolerance: float

    @property
    def improvement(self) -> float:
        """Relative loss reduction of the candidate over the base (0.25 = 25% lower)."""
        return (self.base_loss - self.candidate_loss) / self.base_loss if self.base_loss else 0.0


def decide_gate(
    base_loss: float,
    candidate_loss: float,
    production_loss: float | None = None,
    min_improvement: float = DEFAULT_GATE.min_improvement,
    production_tolerance: float = DEFAULT_GATE.production_tolerance,
) -> GateDecision:
    """Pass when the candidate beats the base by ``min_improvement`` (relative) and is not
    worse than the current production adapter by more than ``production_tolerance``.
    """
    figures = (base_loss, candidate_loss, production_loss, min_improvement, production_tolerance)
    if not all(math.isfinite(x) for x in (base_loss, candidate_loss)):
        return GateDecision(False, "a loss is not finite (training diverged)", *figures)
    improvement = (base_loss - candidate_loss) / base_loss if base_loss else 0.0
    if improvement < min_improvement:
        reason = (
            f"candidate eval loss {candidate_loss:.4f} is {improvement:.1%} below the base's "
            f"{base_loss:.4f}; the gate needs at least {min_improvement:.1%}"
        )
        return GateDecision(False, reason, *figures)
    if production_loss is not None and candidate_loss > production_loss * (
        1 + production_tolerance
    ):
        reason = (
            f"candidate eval loss {candidate_loss:.4f} is worse than production's "
            f"{production_loss:.4f} by more than {production_tolerance:.1%}"
        )
        return GateDecision(False, reason, *figures)
    reason = f"candidate eval loss {candidate_loss:.4f} is {improvement:.1%} below the base's"
    if production_loss is not None:
        reason += f" and within {production_tolerance:.1%} of production's {production_loss:.4f}"
    return GateDecision(True, reason, *figures)


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
    prompts: Sequence[Sequence[dict[str, str]]],
    *,
    has_production: bool,
    batch_size: int = 8,
    max_new_tokens: int = 48,
) -> Evaluation:
    """Measure ``model``'s base and its ``candidate`` (and ``production``) adapters.

    The adapters are already loaded on ``model`` under those names; one copy of the base
    serves all three, switched per call.
    """
    pad_id = int(tokenizer.pad_token_id)
    losses: dict[str | None, float] = {}
    for adapter in (None, "candidate", "production" if has_production else None):
        if adapter in losses:
            continue
        with adapters_in_use(model, adapter):
            losses[adapter] = eval_loss(model, eval_examples, pad_id, batch_size)
    generations = []
    for messages in prompts:
        row = {"prompt": messages[-1]["content"]}
        for column, adapter in (("base", None), ("candidate", "candidate")):
            row[column] = generate_reply(model, tokenizer, messages, max_new_tokens, adapter)
        generations.append(row)
    return Evaluation(
        base_loss=losses[None],
        candidate_loss=losses["candidate"],
        production_loss=losses.get("production"),
        generations=generations,
    )
