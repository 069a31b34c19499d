"""One forward pass over running requests, each at its own position in its own blocks.

Rows are left-padded to the longest chunk of the pass, so the last position of every row
is its last real token (the only one sampled from). Each real token gets its own position
id and attends to its own row's context up to itself; padding attends to one slot of its
row and writes to the spare slot, so it neither reads nor leaves anything that matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from lora_ops.base_models import autocast_for
from lora_ops.lora.slots import AdapterSlots
from lora_ops.serving.kv_cache import ForwardCache, KVStore


@dataclass(frozen=True)
class RowWork:
    """What one row computes in a pass: ``tokens``, from position ``start``, in ``blocks``."""

    tokens: Sequence[int]
    start: int
    blocks: Sequence[int]
    slot: int  # its adapter slot


class ModelRunner:
    """Runs the engine's model over :class:`RowWork` with its preallocated KV store."""

    def __init__(
        self, model: PreTrainedModel, store: KVStore, slots: AdapterSlots, pad_id: int
    ) -> None:
        self.model = model
        self.store = store
        self.slots = slots
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.additive_mask = model.config._attn_implementation == "eager"

    def forward(self, work: Sequence[RowWork]) -> torch.Tensor:
        """Each row's logits at its last new token, (rows, vocab)."""
        inputs = self._inputs(work)
        self.slots.route([w.slot for w in work])
        try:
            with torch.no_grad(), autocast_for(self.device):
                out = self.model(
                    input_ids=inputs.ids,
                    attention_mask=inputs.mask,
                    position_ids=inputs.positions,
                    cache=inputs.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        finally:
            self.slots.clear_route()
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _inputs(self, work: Sequence[RowWork]) -> _Inputs:
        width = max(len(w.tokens) for w in work)
        context = max(w.start + len(w.tokens) for w in work)
        block = self.store.block_size
        ids = torch.full((len(work), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(work), width), dtype=torch.long)
        tables = torch.zeros((len(work), -(-context // block)), dtype=torch.long)
        ends = torch.empty(len(work), dtype=torch.long)
        for row, item in enumerate(work):
            n = len(item.tokens)
            ids[row, width - n :] = torch.tensor(list(item.tokens), dtype=torch.long)
            positions[row, width - n :] = torch.arange(item.start, item.start + n)
            # A row may hold blocks reserved ahead of this pass's tokens; only those it
            # reaches matter here.
            held = list(item.blocks[: -(-(item.start + n) // block)])
            tables[row, : len(held)] = torch.tensor(held, dtype=torch.long)
            ends[row] = item.start + n
        padding = (
            torch.arange(width) < (width - torch.tensor([len(w.tokens) for w in work]))[:, None]
        )
        write = self._slots_at(tables, positions)
        write[padding] = self.store.spare
        span = torch.arange(context)
        read = self._slots_at(tables, span.expand(len(work), context))
        read[span[None, :] >= ends[:, None]] = self.store.spare
        # A token sees its row up to itself; padding (position 0) sees the row's first slot.
        allowed = span[None, None, None, :] <= positions[:, None, :, None]
        mask: torch.Tensor = allowed
        if self.additive_mask:
            mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        cache = ForwardCache(self.store, write.reshape(-1).to(self.device), read.to(self.device))
        return _Inputs(ids.to(self.device), positions.to(self.device), mask.to(self.device), cache)

    def _slots_at(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        block = self.store.block_size
        return tables.gather(1, positions // block) * block + positions % block


@dataclass(frozen=True)
class _Inputs:
    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    cache: ForwardCache
