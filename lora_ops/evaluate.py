"""Held-out loss and perplexity, and greedy generations for people to read."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lora_ops.batching import Tokenized, collate, count_loss_tokens, summed_nll


def autocast_for(device: torch.device) -> torch.autocast | nullcontext[None]:
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPU bf16 is slower and less exact)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


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
def generate_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    max_new_tokens: int = 64,
) -> str:
    """The greedy assistant reply to a chat, rendered with the model's chat template."""
    device = next(model.parameters()).device
    encoded = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    input_ids = cast(Mapping[str, torch.Tensor], encoded)["input_ids"].to(device)
    with autocast_for(device):
        output = model.generate(  # type: ignore[operator]  # transformers types it loosely
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)).strip()
