"""One optimizer step: forward and backward over a window of micro-batches, clip, update."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from lora_ops.base_models import autocast_for
from lora_ops.config import TrainConfig
from lora_ops.training.batching import Tokenized, count_loss_tokens, summed_nll
from lora_ops.training.packing import collate_rows


def optimizer_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    window: list[list[Tokenized]],
    pad_id: int,
    lr: float,
    config: TrainConfig,
) -> tuple[float, float]:
    """One optimizer step over a window of micro-batches; returns (loss, gradient norm).

    Each micro-batch's summed loss is divided by the labelled tokens of the whole window,
    so accumulation gives the same gradient as one big batch. A micro-batch is examples,
    or packs of them (``config.packing``): the same tokens carry the same loss either way.
    """
    device = next(model.parameters()).device
    window_tokens = max(1, sum(count_loss_tokens(micro) for micro in window))
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = 0.0
    for micro in window:
        batch = collate_rows(micro, pad_id, device)
        with autocast_for(device):
            loss = summed_nll(model, batch) / window_tokens
        loss.backward()
        step_loss += loss.item()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = clip_gradients(params, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, norm


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip to ``max_norm`` (None: no clipping); the total norm before clipping."""
    if max_norm is None:
        grads = [p.grad.detach().norm() for p in params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
