"""The schedule of a run: how many optimizer steps, each one's learning rate, and which
examples each micro-batch holds.

Every data-parallel rank draws the same order, and each takes its share of every
micro-batch (``distributed.share``), so the global batches are those of one process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from lora_ops.config import TrainConfig


def learning_rate_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to zero. ``step`` counts from 0."""
    warmup = math.ceil(config.warmup_ratio * total_steps)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps_for(n_train: int, config: TrainConfig, n_examples: int | None = None) -> int:
    """Optimizer steps over ``n_train`` rows; ``epochs="auto"`` counts ``n_examples`` (the
    examples the rows pack, default one a row), as it is a rule about examples seen."""
    micro_per_epoch = math.ceil(n_train / config.batch_size)
    per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    epochs = config.epochs_for(n_train if n_examples is None else n_examples)
    return config.max_steps if config.max_steps is not None else per_epoch * epochs


def micro_batches(n_train: int, config: TrainConfig, start_step: int) -> Iterator[list[int]]:
    """Example indices of each micro-batch from optimizer step ``start_step`` on.

    Each epoch's order is a permutation drawn from (seed, epoch) alone, so a resumed run
    sees exactly the batches the uninterrupted run would have seen.
    """
    micro_per_epoch = math.ceil(n_train / config.batch_size)
    m = start_step * config.grad_accum
    order: list[int] = []
    epoch = -1
    while True:
        if m // micro_per_epoch != epoch:
            epoch = m // micro_per_epoch
            generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            order = torch.randperm(n_train, generator=generator).tolist()
        start = (m % micro_per_epoch) * config.batch_size
        yield order[start : start + config.batch_size]
        m += 1
