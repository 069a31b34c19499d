"""LoRALinear: a frozen linear layer plus named low-rank adapters, mergeable and row-routable.

``h = W0 x + scaling * B (A x)`` with ``A`` (r x d_in) and ``B`` (d_out x r) per adapter.
The base is an ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2), whose weight is stored
transposed, (d_in, d_out): PEFT's ``fan_in_fan_out``. A and B keep the same shapes either
way (so saved files are PEFT's); only merging transposes the update.
Which adapter a forward uses is set by the routing helpers in ``inject``: one adapter for
every row, none, or one per batch row (the mixed batch that serving relies on).

A mixed batch at inference runs as two batched matmuls per layer, whatever the number of
adapters in it (the BGMV idea of Punica and S-LoRA): each row's A and B are gathered once
per batch into (rows, d_in, r) and (rows, r, d_out) stacks that every decoding step reuses.
Looping over adapters instead costs a handful of small kernels per adapter per layer per
token, which on a 16-adapter batch takes longer than the base model's own matmuls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from lora_ops.errors import InputError
from lora_ops.lora.spec import LoraSpec
from lora_ops.lora.targets import is_conv1d, linear_shape

# Adding B A to 4-bit codes would corrupt them, and re-quantizing the merged weight would
# round the update away: the adapter is trained against the dequantized weights, and it
# is the unquantized base it merges into.
QUANTIZED_MERGE = (
    "cannot merge into a 4-bit quantized base: its weights are NF4 codes, and adding the "
    "update then quantizing again would round it away; merge into the unquantized base "
    "(lora-ops merge loads it in full precision), or serve the adapter unmerged"
)


@dataclass
class SlotStacks:
    """Per-slot adapter weights of one layer for a running batch (see ``lora.slots``).

    ``a[s]`` is slot ``s``'s A^T (d_in, rank) and ``b[s]`` its scaling * B^T (rank, d_out),
    zero for a slot on the base or on an adapter without this layer; ranks are padded to
    the largest, zero columns giving the same product.
    """

    a: torch.Tensor  # (slots, d_in, rank)
    b: torch.Tensor  # (slots, rank, d_out)


@dataclass(frozen=True)
class SlotRoute:
    """Which slots the rows of one forward pass use.

    ``slots`` maps batch rows to slots: a slice when they are consecutive (then the stacks
    are read in place), else an index tensor. ``uniform`` is the one slot whose weights
    every row shares, when they do (plain matmuls then); ``any_adapter`` False means every
    row is on the base.
    """

    slots: slice | torch.Tensor
    uniform: int | None
    any_adapter: bool


@dataclass(frozen=True)
class RowGroup:
    """The batch rows that use one adapter in a mixed batch."""

    adapter: str
    rows: torch.Tensor  # (n_rows,) int64 indices into the batch


class LoRALinear(nn.Module):
    """A frozen ``base_layer`` with any number of named adapters beside it.

    Adapters live in ``lora_A[name]`` / ``lora_B[name]`` (nn.Linear without bias), PEFT's
    naming, so saving needs only a key prefix. The base weight never gets a gradient.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.fan_in_fan_out = is_conv1d(base_layer)
        if not (isinstance(base_layer, nn.Linear) or self.fan_in_fan_out):
            raise TypeError(
                f"LoRALinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self._d_out, self._d_in = linear_shape(base_layer)
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.specs: dict[str, LoraSpec] = {}
        self.merged: list[str] = []
        # Routing: one adapter name for all rows, None for the base alone, or row groups.
        self.active: str | None = None
        self._row_groups: list[RowGroup] | None = None
        # Per-row (A^T, scaling * B^T) stacks for the current row groups; built on first use.
        self._row_stacks: tuple[torch.Tensor, torch.Tensor] | None = None
        # The serving engine's running batch: per-slot weights, and this forward's rows.
        self.slot_stacks: SlotStacks | None = None
        self.slot_route: SlotRoute | None = None

    @property
    def row_groups(self) -> list[RowGroup] | None:
        return self._row_groups

    @row_groups.setter
    def row_groups(self, groups: list[RowGroup] | None) -> None:
        self._row_groups = groups
        self._row_stacks = None

    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def d_out(self) -> int:
        return self._d_out

    @property
    def base_weight(self) -> torch.Tensor:
        """The base layer's weight: (d_out, d_in), or (d_in, d_out) with ``fan_in_fan_out``."""
        return cast(torch.Tensor, self.base_layer.weight)

    @property
    def quantized(self) -> bool:
        """Whether the base weight is stored quantized (4-bit NF4 codes), not as floats."""
        return not self.base_weight.is_floating_point()

    def add_adapter(self, name: str, spec: LoraSpec, *, initialise: bool = True) -> None:
        """Add adapter ``name``: A Kaiming-uniform, B zero, so the output is unchanged.

        ``initialise=False`` leaves A and B as allocated (garbage): for loading saved
        weights over them, where drawing random numbers first is wasted time.
        """
        if name in self.specs:
            raise InputError(f"adapter {name!r} is already on this layer", field="adapter")
        device = self.base_weight.device
        # Built on the meta device, then given memory: no init that would be overwritten.
        lora_a = nn.Linear(self.d_in, spec.r, bias=False, device="meta").to_empty(device=device)
        lora_b = nn.Linear(spec.r, self.d_out, bias=False, device="meta").to_empty(device=device)
        if initialise:
            # nn.Linear's own init for A (as PEFT does); B = 0 starts the update at zero.
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_b.weight)
        self.lora_A[name] = lora_a
        self.lora_B[name] = lora_b
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.specs[name] = spec
        self._row_stacks = None

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self.merged:
            raise InputError(f"adapter {name!r} is merged; unmerge it first", field="adapter")
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.specs[name]
        if self.active == name:
            self.active = None
        self._row_stacks = None

    def weight_a(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s A, shape (r, d_in)."""
        return cast(nn.Linear, self.lora_A[name]).weight

    def weight_b(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s B, shape (d_out, r)."""
        return cast(nn.Linear, self.lora_B[name]).weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B A``: what merging adds to the base weight, in its layout
        ((d_out, d_in), or (d_in, d_out) for a ``Conv1D``)."""
        self._require(name)
        delta = (self.weight_b(name) @ self.weight_a(name)) * self.specs[name].scaling
        return delta.t() if self.fan_in_fan_out else delta

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight: zero added latency afterwards."""
        self._require(name)
        if name in self.merged:
            return
        if self.quantized:
            raise InputError(QUANTIZED_MERGE, field="adapter")
        with torch.no_grad():
            weight = self.base_weight
            weight += self.delta_weight(name).to(weight.dtype)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        """Take a merged adapter back out of the base weight (exact up to float rounding)."""
        if name not in self.merged:
            raise InputError(f"adapter {name!r} is not merged", field="adapter")
        with torch.no_grad():
            weight = self.base_weight
            weight -= self.delta_weight(name).to(weight.dtype)
        self.merged.remove(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x)
        if self.slot_route is not None:
            return self._add_slot_rows(x, result, self.slot_route)
        if self.row_groups is not None:
            if self.merged:
                raise RuntimeError(
                    f"adapters {self.merged} are merged into the weight; unmerge them "
                    "before a mixed-adapter batch"
                )
            if len(self.row_groups) > 1 and not (self.training and torch.is_grad_enabled()):
                return self._add_row_stacks(x, result)
            return self._add_row_groups(x, result)
        if self.active is None or self.active in self.merged:
            return result
        return self._add_lora(self.active, x, result)

    def _add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + scaling * B (A x)``, the add, scale and second matmul as one addmm."""
        weight_a, weight_b = self.weight_a(name), self.weight_b(name)
        x = self.lora_dropout[name](x.to(weight_a.dtype))
        hidden = F.linear(x, weight_a)  # (..., r)
        scaling = self.specs[name].scaling
        if hidden.dtype != result.dtype:  # e.g. an fp32 adapter on a bf16 base, no autocast
            return result + (F.linear(hidden, weight_b) * scaling).to(result.dtype)
        # Scaling the r-wide product inside addmm saves two (tokens x d_out) temporaries
        # (PEFT's ``lora_B(lora_A(x)) * scaling`` then ``result + ...``).
        summed = torch.addmm(
            result.reshape(-1, self.d_out),
            hidden.reshape(-1, hidden.shape[-1]),
            weight_b.t(),
            alpha=scaling,
        )
        return summed.view(result.shape)

    def _lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = self.lora_dropout[name](x.to(self.weight_a(name).dtype))
        # (..., d_in) @ (d_in, r) -> (..., r) @ (r, d_out) -> (..., d_out)
        return (
            F.linear(F.linear(x, self.weight_a(name)), self.weight_b(name))
            * self.specs[name].scaling
        )

    def _add_row_groups(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # The base matmul is shared by the whole batch; each adapter's rows get their own
        # low-rank update, computed once per adapter on just those rows. Training takes
        # this path: it applies each adapter's dropout.
        assert self.row_groups is not None
        for group in self.row_groups:
            delta = self._lora_delta(group.adapter, x.index_select(0, group.rows))
            result = result.index_add(0, group.rows, delta.to(result.dtype))
        return result

    def _add_row_stacks(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        assert self.row_groups  # forward takes this path for two or more groups
        dtype = self.weight_a(self.row_groups[0].adapter).dtype
        if torch.is_autocast_enabled(x.device.type):  # stack once in the dtype bmm will use
            dtype = torch.get_autocast_dtype(x.device.type)
        stacked_a, stacked_b = self._stacks_for(x.shape[0], dtype)
        rows = x.reshape(x.shape[0], -1, self.d_in).to(dtype)  # (rows, tokens, d_in)
        hidden = torch.bmm(rows, stacked_a)  # (rows, tokens, r)
        flat = result.reshape(x.shape[0], -1, self.d_out)
        if flat.dtype != hidden.dtype:
            return result + torch.bmm(hidden, stacked_b).view(result.shape).to(result.dtype)
        return torch.baddbmm(flat, hidden, stacked_b).view(result.shape)

    def _add_slot_rows(
        self, x: torch.Tensor, result: torch.Tensor, route: SlotRoute
    ) -> torch.Tensor:
        stacks = self.slot_stacks
        if stacks is None or not route.any_adapter:
            return result
        if self.merged:
            raise RuntimeError(f"adapters {self.merged} are merged into the weight")
        rows = x.reshape(x.shape[0], -1, self.d_in).to(stacks.a.dtype)  # (rows, tokens, d_in)
        if route.uniform is not None:
            a, b = stacks.a[route.uniform], stacks.b[route.uniform]
            hidden = torch.matmul(rows, a).reshape(-1, a.shape[-1])
            if result.dtype != b.dtype:
                return result + (hidden @ b).view(result.shape).to(result.dtype)
            return torch.addmm(result.reshape(-1, self.d_out), hidden, b).view(result.shape)
        hidden = torch.bmm(rows, stacks.a[route.slots])  # (rows, tokens, rank)
        if result.dtype != stacks.b.dtype:
            delta = torch.bmm(hidden, stacks.b[route.slots])
            return result + delta.view(result.shape).to(result.dtype)
        # The add fused into the second matmul: one (rows x d_out) temporary fewer per layer.
        flat = result.reshape(rows.shape[0], -1, self.d_out)
        return torch.baddbmm(flat, hidden, stacks.b[route.slots]).view(result.shape)

    def _stacks_for(self, n_rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's A^T and scaling * B^T, zero for rows on the base; ranks padded."""
        stacks = self._row_stacks
        if stacks is not None and stacks[0].shape[0] == n_rows and stacks[0].dtype == dtype:
            return stacks
        assert self.row_groups is not None
        rank = max(self.specs[g.adapter].r for g in self.row_groups)
        device = self.weight_a(self.row_groups[0].adapter).device
        zero_a = torch.zeros((self.d_in, rank), dtype=dtype, device=device)
        zero_b = torch.zeros((rank, self.d_out), dtype=dtype, device=device)
        per_row_a, per_row_b = [zero_a] * n_rows, [zero_b] * n_rows
        with torch.no_grad():
            for group in self.row_groups:
                spec = self.specs[group.adapter]
                pad = rank - spec.r  # a smaller rank gets zero columns: the same product
                weight_a = F.pad(self.weight_a(group.adapter).t().to(dtype), (0, pad))
                weight_b = F.pad(
                    (self.weight_b(group.adapter).t() * spec.scaling).to(dtype), (0, 0, 0, pad)
                )
                for row in group.rows.tolist():
                    per_row_a[row], per_row_b[row] = weight_a, weight_b
            # One copy per layer per batch; every decoding step reuses it.
            stacked_a, stacked_b = torch.stack(per_row_a), torch.stack(per_row_b)
        self._row_stacks = (stacked_a, stacked_b)
        return self._row_stacks

    def _require(self, name: str) -> None:
        if name not in self.specs:
            known = ", ".join(self.specs) or "none"
            raise InputError(f"no adapter {name!r} on this layer (has: {known})", field="adapter")

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={s.r}" for n, s in self.specs.items())
        return f"d_in={self.d_in}, d_out={self.d_out}, adapters=[{ranks}], merged={self.merged}"
