"""Run configurations as pydantic models, checked at the door."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lora_ops.defaults import DEFAULT_BASE, DEFAULT_GATE, EvalGate
from lora_ops.lora.spec import LoraSpec

__all__ = ["DEFAULT_BASE", "DEFAULT_GATE", "EvalGate", "LoraSpec", "TrainConfig"]


class TrainConfig(BaseModel):
    """How one adapter is trained. Logged as the record of what ran."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lora: LoraSpec = Field(default_factory=LoraSpec)
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on A and B.")
    epochs: int = Field(1, ge=1, le=1000, description="Passes over the training split.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    max_seq_len: int = Field(512, ge=16, le=131072, description="Longer examples are refused.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm.")
    seed: int = Field(0, ge=0, description="Seeds A's init, dropout and the data order.")
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of examples held out for evaluation."
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="Save a resumable checkpoint every N optimizer steps."
    )
