"""Run configurations as pydantic models, checked at the door."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from lora_ops.defaults import DEFAULT_BASE, DEFAULT_GATE, EvalGate
from lora_ops.lora.spec import LoraSpec

__all__ = ["DEFAULT_BASE", "DEFAULT_GATE", "EvalGate", "LoraSpec", "TrainConfig", "auto_epochs"]

AUTO = "auto"
MAX_EPOCHS = 1000
# OpenAI's default for n_epochs="auto" (the cookbook's "Data preparation and analysis for
# chat model fine-tuning"): 3 passes, raised until about 100 examples are seen in all and
# lowered until about 25,000 are, kept within 1..25 passes.
TARGET_EPOCHS, MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES = 3, 100, 25_000
MIN_AUTO_EPOCHS, MAX_AUTO_EPOCHS = 1, 25
BASE_DTYPES = ("auto", "float32", "bfloat16")


def auto_epochs(n_train: int) -> int:
    """The passes ``epochs="auto"`` makes over ``n_train`` examples (OpenAI's rule)."""
    n_train = max(1, n_train)
    if n_train * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, MIN_TARGET_EXAMPLES // n_train)
    if n_train * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_AUTO_EPOCHS, MAX_TARGET_EXAMPLES // n_train)
    return TARGET_EPOCHS


class TrainConfig(BaseModel):
    """How one adapter is trained. Logged as the record of what ran."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lora: LoraSpec = Field(default_factory=LoraSpec)
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on A and B.")
    epochs: int | Literal["auto"] = Field(
        1,
        description=f"Passes over the training split (1-{MAX_EPOCHS}), or 'auto': chosen "
        "from the example count as OpenAI's fine-tuning does (3, more for small sets).",
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    max_seq_len: int = Field(512, ge=16, le=131072, description="Longer examples are refused.")
    packing: bool = Field(
        False,
        description="Pack short examples into rows of up to max_seq_len tokens (batch_size "
        "then counts rows); attention stays inside each example.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, more time."
    )
    base_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="The frozen base's weights: 'auto' is bfloat16 on CUDA, float32 elsewhere. "
        "LoRA weights and optimizer state stay float32.",
    )
    quantize: Literal["nf4"] | None = Field(
        None,
        description="Load the frozen base 4-bit NF4 (QLoRA, bitsandbytes); base_dtype is then "
        "the compute dtype.",
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm.")
    seed: int = Field(0, ge=0, description="Seeds A's init, dropout and the data order.")
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of examples held out for evaluation."
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="Save a resumable checkpoint every N optimizer steps."
    )
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Measure the held-out loss every N optimizer steps (and after the last); "
        "the best-scoring weights, not the last, become the adapter.",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop after this many held-out evaluations without improvement "
        "(needs eval_every).",
    )
    warm_start: Literal["production"] | None = Field(
        None,
        description="Start from the customer's production adapter instead of a fresh one "
        "(same base and LoRA shape); for retraining on incremental data.",
    )

    @field_validator("epochs", mode="before")
    @classmethod
    def _check_epochs(cls, value: Any) -> int | str:
        if value == AUTO:
            return AUTO
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if type(value) is not int or not 1 <= value <= MAX_EPOCHS:
            raise ValueError(
                f"must be a whole number of passes from 1 to {MAX_EPOCHS}, or 'auto'; got {value!r}"
            )
        return value

    @field_validator("early_stopping_patience")
    @classmethod
    def _patience_needs_evaluations(cls, patience: int | None, info: ValidationInfo) -> int | None:
        if patience is not None and info.data.get("eval_every") is None:
            raise ValueError(
                "counts held-out evaluations, and none are made: set eval_every too "
                "(--eval-every N)"
            )
        return patience

    @field_validator("warm_start", mode="before")
    @classmethod
    def _check_warm_start(cls, value: Any) -> Any:
        if value is not None and value != "production":
            raise ValueError(
                f"the only adapter a retrain can start from is 'production'; got {value!r}"
            )
        return value

    @field_validator("base_dtype", mode="before")
    @classmethod
    def _check_base_dtype(cls, value: Any) -> Any:
        if value not in BASE_DTYPES:
            raise ValueError(f"must be one of {', '.join(BASE_DTYPES)}; got {value!r}")
        return value

    @field_validator("quantize", mode="before")
    @classmethod
    def _check_quantize(cls, value: Any) -> Any:
        if value is not None and value != "nf4":
            raise ValueError(
                f"the only quantization is 'nf4' (4-bit NormalFloat, as QLoRA); got {value!r}"
            )
        return value

    def epochs_for(self, n_train: int) -> int:
        """The passes over ``n_train`` examples this config asks for, 'auto' resolved."""
        return auto_epochs(n_train) if self.epochs == AUTO else int(self.epochs)
