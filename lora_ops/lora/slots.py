"""Adapter slots: each running request's adapter weights, copied into per-layer stacks.

A serving engine keeps a batch of requests running while requests join and leave between
decoding steps. Each request holds a slot, and every LoRA layer keeps a stack of per-slot
A and B (:class:`~lora_ops.lora.layer.SlotStacks`): a request joining writes its adapter's
weights into its slot once, one leaving frees it, and a step with any mix of adapters runs
as two batched matmuls per layer over the stacks (the BGMV idea of Punica and S-LoRA).
Nothing is gathered per step when the rows of a forward hold consecutive slots.

Because a running request has its own copy, the adapter itself may leave the model (the
cache evicts it, an admin unloads it) without disturbing the requests already decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lora_ops.lora.layer import LoRALinear, SlotRoute, SlotStacks


class AdapterSlots:
    """``num_slots`` slots over every LoRA layer of ``model``; stacks held in ``dtype``."""

    def __init__(self, model: nn.Module, num_slots: int, dtype: torch.dtype) -> None:
        self.model = model
        self.num_slots = num_slots
        self.dtype = dtype
        self.adapter_of: list[str | None] = [None] * num_slots
        # Which weights each slot holds: the adapter's name, or a version of it, so two
        # rows on two versions of one adapter never share the uniform path.
        self.weights_of: list[str | None] = [None] * num_slots
        self._layers: list[LoRALinear] = []

    def _walk(self) -> list[LoRALinear]:
        # Walked again whenever a slot is filled: loading an adapter may have wrapped new
        # layers, and every step's routing reuses the list instead of walking the model.
        self._layers = self.layers()
        return self._layers

    def layers(self) -> list[LoRALinear]:
        """The model's LoRA layers (walked afresh: an adapter may have wrapped new ones)."""
        found: list[LoRALinear] = []
        modules = list(self.model.children())
        while modules:
            module = modules.pop()
            if isinstance(module, LoRALinear):
                found.append(module)
            else:
                modules.extend(module.children())
        return found

    def fill(self, slot: int, adapter: str | None, version: str | None = None) -> None:
        """Give ``slot`` the weights of ``adapter`` (resident in the model), or the base.

        ``version`` tells versions of one adapter apart (default: the name alone).
        """
        self.adapter_of[slot] = adapter
        self.weights_of[slot] = None if adapter is None else (version or adapter)
        with torch.no_grad():
            for layer in self._walk():
                if adapter is not None and adapter in layer.specs:
                    self._write(layer, slot, adapter)
                elif layer.slot_stacks is not None:
                    layer.slot_stacks.a[slot].zero_()
                    layer.slot_stacks.b[slot].zero_()

    def _write(self, layer: LoRALinear, slot: int, adapter: str) -> None:
        spec = layer.specs[adapter]
        stacks = self._stacks(layer, spec.r)
        stacks.a[slot].zero_()
        stacks.b[slot].zero_()
        stacks.a[slot, :, : spec.r] = layer.weight_a(adapter).t().to(self.dtype)
        stacks.b[slot, : spec.r] = (layer.weight_b(adapter).t() * spec.scaling).to(self.dtype)

    def _stacks(self, layer: LoRALinear, rank: int) -> SlotStacks:
        """The layer's stacks, made (or widened to ``rank``) on first need."""
        stacks = layer.slot_stacks
        if stacks is not None and stacks.a.shape[-1] >= rank:
            return stacks
        device = layer.base_weight.device
        a = torch.zeros((self.num_slots, layer.d_in, rank), dtype=self.dtype, device=device)
        b = torch.zeros((self.num_slots, rank, layer.d_out), dtype=self.dtype, device=device)
        if stacks is not None:  # a larger rank arrived: keep every slot, pad with zeros
            old = stacks.a.shape[-1]
            a[:, :, :old], b[:, :old] = stacks.a, stacks.b
        layer.slot_stacks = SlotStacks(a, b)
        return layer.slot_stacks

    def move(self, source: int, target: int) -> None:
        """Copy slot ``source``'s weights into slot ``target``."""
        self.adapter_of[target] = self.adapter_of[source]
        self.weights_of[target] = self.weights_of[source]
        with torch.no_grad():
            for layer in self._layers:
                if layer.slot_stacks is not None:
                    layer.slot_stacks.a[target] = layer.slot_stacks.a[source]
                    layer.slot_stacks.b[target] = layer.slot_stacks.b[source]

    def route(self, slots: Sequence[int]) -> None:
        """Route the next forward's rows (in order) through ``slots``' weights."""
        adapters = {self.weights_of[s] for s in slots}
        uniform = slots[0] if len(adapters) == 1 else None
        lo = slots[0]
        consecutive = list(slots) == list(range(lo, lo + len(slots)))
        index: slice | torch.Tensor
        if consecutive:
            index = slice(lo, lo + len(slots))
        else:
            index = torch.tensor(list(slots), dtype=torch.long)
        route = SlotRoute(index, uniform, adapters != {None})
        for layer in self._layers:
            if isinstance(index, torch.Tensor) and layer.slot_stacks is not None:
                index = index.to(layer.slot_stacks.a.device)
                route = SlotRoute(index, uniform, route.any_adapter)
            layer.slot_route = route

    def clear_route(self) -> None:
        for layer in self._layers:
            layer.slot_route = None
