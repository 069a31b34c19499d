"""The eval gate: whether a candidate adapter may be registered, and why.

The thresholds are defaulted once, in ``lora_ops.defaults.EvalGate``; this module only
applies them to the measured losses (no torch, so the decision is cheap to import and test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_ops.defaults import DEFAULT_GATE


@dataclass(frozen=True)
class GateDecision:
    """Whether a candidate adapter may be registered, with the figures behind it."""

    passed: bool
    reason: str
    base_loss: float
    candidate_loss: float
    production_loss: float | None
    min_improvement: float
    production_tolerance: float

    @property
    def improvement(self) -> float:
        """Relative loss reduction of the candidate over the base (0.25 = 25% lower)."""
        return (self.base_loss - self.candidate_loss) / self.base_loss if self.base_loss else 0.0


def decide_gate(
    base_loss: float,
    candidate_loss: float,
    production_loss: float | None = None,
    min_improvement: float = DEFAULT_GATE.min_improvement,
    production_tolerance: float = DEFAULT_GATE.production_tolerance,
) -> GateDecision:
    """Pass when the candidate beats the base by ``min_improvement`` (relative) and is not
    worse than the current production adapter by more than ``production_tolerance``.
    """
    figures = (base_loss, candidate_loss, production_loss, min_improvement, production_tolerance)
    if not all(math.isfinite(x) for x in (base_loss, candidate_loss)):
        return GateDecision(False, "a loss is not finite (training diverged)", *figures)
    improvement = (base_loss - candidate_loss) / base_loss if base_loss else 0.0
    if improvement < min_improvement:
        reason = (
            f"candidate eval loss {candidate_loss:.4f} is {improvement:.1%} below the base's "
            f"{base_loss:.4f}; the gate needs at least {min_improvement:.1%}"
        )
        return GateDecision(False, reason, *figures)
    if production_loss is not None and candidate_loss > production_loss * (
        1 + production_tolerance
    ):
        reason = (
            f"candidate eval loss {candidate_loss:.4f} is worse than production's "
            f"{production_loss:.4f} by more than {production_tolerance:.1%}"
        )
        return GateDecision(False, reason, *figures)
    reason = f"candidate eval loss {candidate_loss:.4f} is {improvement:.1%} below the base's"
    if production_loss is not None:
        reason += f" and within {production_tolerance:.1%} of production's {production_loss:.4f}"
    return GateDecision(True, reason, *figures)
