"""Test helpers shared by several test files."""

from __future__ import annotations

import torch
from torch import nn

from lora_ops.lora import lora_layers


def randomize_adapter(model: nn.Module, adapter: str, seed: int = 0, std: float = 0.05) -> None:
    """Give B (and A) random values: with B = 0 merge/save/load tests pass even when broken."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if adapter in layer.specs:
                for weight in (layer.weight_a(adapter), layer.weight_b(adapter)):
                    noise = torch.randn(weight.shape, generator=generator) * std
                    weight.copy_(noise.to(weight.device, weight.dtype))


def sample_input_ids(vocab_size: int, batch: int = 3, seq: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)
