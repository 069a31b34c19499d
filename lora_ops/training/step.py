"""One optimizer step: forward and backward over a window of micro-batches, clip, update.

Under data parallelism (``training.distributed``) each rank passes its share of the window;
the labelled tokens and the gradients are summed across the ranks, so every rank takes the
step a single process would take on the whole window.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from lora_ops.base_models import autocast_for
from lora_ops.config import TrainConfig
from lora_ops.training import distributed
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

    Each micro-batch's summed loss is divided by the labelled tokens of the whole window
    (of every rank's share), so accumulation and data parallelism give the same gradient
    as one big batch. A micro-batch is examples, or packs of them (``config.packing``):
    the same tokens carry the same loss either way. A rank's share of a micro-batch may be
    empty (the last of an epoch can be smaller than the ranks); it then adds nothing.
    """
    device = next(model.parameters()).device
    local_tokens = sum(count_loss_tokens(micro) for micro in window)
    window_tokens = max(1, distributed.sum_count(local_tokens))
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = 0.0
    for micro in window:
        if not micro:
            continue
        batch = collate_rows(micro, pad_id, device)
        with autocast_for(device):
            loss = summed_nll(model, batch) / window_tokens
        loss.backward()
        step_loss += loss.item()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    distributed.sum_gradients(params)  # before clipping: the norm is the whole window's
    step_loss = distributed.sum_value(step_loss)
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
