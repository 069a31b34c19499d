"""What a customer gets when they name nothing: the base model and the eval gate.

Kept apart from ``config`` (which re-exports both) because it must stay light: the CLI's
option defaults and the settings read it at start-up, and ``config`` imports the LoRA core,
which imports torch.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# The base model a customer gets when none is named.
DEFAULT_BASE = "smollm2-135m-instruct"


class EvalGate(BaseModel):
    """What a candidate adapter must show before it is registered (the one place the
    thresholds are defaulted)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_improvement: float = Field(
        0.05, ge=0, lt=1, description="Relative eval-loss gain over the base needed to pass."
    )
    production_tolerance: float = Field(
        0.02, ge=0, lt=1, description="How much worse than production a candidate may be."
    )


DEFAULT_GATE = EvalGate()
