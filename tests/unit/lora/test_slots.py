"""Adapter slots: per-row weights copied in once, equal to routing each row by name."""

from __future__ import annotations

import torch
from torch import nn

from lora_ops.lora import LoRALinear, LoraSpec
from lora_ops.lora.slots import AdapterSlots


def model_with_adapters() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(nn.Linear(16, 8)), nn.ReLU(), LoRALinear(nn.Linear(8, 4)))
    for index, (name, rank) in enumerate((("acme", 2), ("globex", 6))):
        for layer in (model[0], model[2]):
            if name == "globex" and layer is model[2]:
                continue  # globex adapts only the first layer
            layer.add_adapter(name, LoraSpec(r=rank, alpha=3 * rank))
            generator = torch.Generator().manual_seed(index)
            with torch.no_grad():
                layer.weight_b(name).normal_(generator=generator)
    return model


def by_name(model: nn.Module, x: torch.Tensor, adapter: str | None) -> torch.Tensor:
    for layer in (model[0], model[2]):
        layer.active = adapter if adapter in layer.specs else None
    try:
        out: torch.Tensor = model(x)
        return out
    finally:
        for layer in (model[0], model[2]):
            layer.active = None


def test_each_row_through_its_slot_equals_that_adapter_alone() -> None:
    model = model_with_adapters()
    slots = AdapterSlots(model, num_slots=4, dtype=torch.float32)
    for slot, adapter in enumerate(("acme", None, "globex", "acme")):
        slots.fill(slot, adapter)
    x = torch.randn(4, 3, 16)
    for order in ([0, 1, 2, 3], [3, 0, 2]):  # in place, and gathered out of order
        slots.route(order)
        mixed = model(x[: len(order)])
        slots.clear_route()
        for row, slot in enumerate(order):
            alone = by_name(model, x[row : row + 1], slots.adapter_of[slot])
            torch.testing.assert_close(mixed[row : row + 1], alone)


def test_a_moved_or_refilled_slot_carries_its_adapter() -> None:
    model = model_with_adapters()
    slots = AdapterSlots(model, num_slots=3, dtype=torch.float32)
    slots.fill(0, "globex")
    slots.fill(1, "acme")
    slots.move(0, 2)
    slots.fill(0, None)
    x = torch.randn(1, 16)
    for slot, adapter in ((2, "globex"), (0, None), (1, "acme")):
        slots.route([slot])  # one row: the uniform path, plain matmuls
        torch.testing.assert_close(model(x), by_name(model, x, adapter))
        slots.clear_route()
