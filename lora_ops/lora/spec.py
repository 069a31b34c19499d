"""LoraSpec: which layers get an adapter and how large it is."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from lora_ops.errors import InputError

# Llama's attention projections; other architectures' are in ``lora.targets``.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# PEFT's shorthand for every linear layer but the output head.
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoraSpec:
    """Shape and scaling of one adapter; written into ``adapter_config.json``.

    Attributes:
        r: rank of ``A`` (r x d_in) and ``B`` (d_out x r).
        alpha: ``scaling = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
        dropout: dropout probability on the LoRA path (training only).
        target_modules: module-name suffixes that get an adapter (``q_proj`` matches
            ``model.layers.0.self_attn.q_proj``); ``("all-linear",)`` for every linear
            layer but the output head; empty (the default) for the base architecture's
            attention projections, filled in when the model is known (``lora.targets``).
        use_rslora: rank-stabilised scaling, https://arxiv.org/abs/2312.03732.
    """

    # Pydantic reads this when a LoraSpec is a field of a pydantic model (TrainConfig, flow
    # parameters): an unknown key is refused instead of silently ignored.
    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid"}

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        else:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise InputError(f"must be a whole number >= 1, got {self.r!r}", field="r")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise InputError(f"must be a number, got {self.alpha!r}", field="alpha")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise InputError(f"must be a finite number > 0, got {self.alpha!r}", field="alpha")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise InputError(f"must be in [0, 1), got {self.dropout!r}", field="dropout")
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise InputError(f"{ALL_LINEAR!r} stands alone", field="target_modules")
        for name in self.target_modules:
            if name == ALL_LINEAR:
                continue
            if (
                not isinstance(name, str)
                or not name
                or not all(part.isidentifier() or part.isdigit() for part in name.split("."))
            ):
                raise InputError(
                    f"{name!r} is not a module name (like 'q_proj' or 'self_attn.q_proj')",
                    field="target_modules",
                )

    @property
    def scaling(self) -> float:
        """The factor applied to ``B A x``."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
