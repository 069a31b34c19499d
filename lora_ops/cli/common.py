"""What every lora-ops command shares: consoles, the training options, error conversion."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from lora_ops.errors import InputError

out = Console(soft_wrap=True)  # long lines stay whole: people copy them, scripts grep them
err = Console(stderr=True)
T = TypeVar("T")

BaseOption = Annotated[
    str, typer.Option("--base", help="Catalogue name (see `base list`) or a transformers folder.")
]
CustomerOption = Annotated[str, typer.Option("--customer", help="Customer id, e.g. acme.")]

# The training options, declared once: `train` gives them defaults, while `pipeline run` and
# `customers add|update` take None as "not given" so a customer's record fills the gap.
RANK = typer.Option("--rank", "-r", help="LoRA rank r.")
ALPHA = typer.Option("--alpha", help="LoRA alpha (scaling alpha/r).")
DROPOUT = typer.Option("--dropout", help="Dropout on the LoRA path.")
TARGETS = typer.Option("--target-modules", help="Comma-separated module-name suffixes.")
RSLORA = typer.Option("--rslora/--no-rslora", help="Scale by alpha/sqrt(r).")
LR = typer.Option("--lr", help="Peak learning rate.")
EPOCHS = typer.Option("--epochs", help="Passes over the data.")
MAX_STEPS = typer.Option("--max-steps", help="Stop after N steps.")
BATCH_SIZE = typer.Option("--batch-size", help="Examples per micro-batch.")
GRAD_ACCUM = typer.Option("--grad-accum", help="Micro-batches per step.")
MAX_SEQ_LEN = typer.Option("--max-seq-len", help="Longest example in tokens.")
SEED = typer.Option("--seed", help="Random seed.")
CHECKPOINT_EVERY = typer.Option("--checkpoint-every", help="Checkpoint every N steps.")
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"

# option name -> where it goes in TrainConfig
_TRAINING_FIELDS = {
    "rank": ("lora", "r"),
    "alpha": ("lora", "alpha"),
    "dropout": ("lora", "dropout"),
    "target_modules": ("lora", "target_modules"),
    "rslora": ("lora", "use_rslora"),
    "lr": ("learning_rate",),
    "epochs": ("epochs",),
    "max_steps": ("max_steps",),
    "batch_size": ("batch_size",),
    "grad_accum": ("grad_accum",),
    "max_seq_len": ("max_seq_len",),
    "seed": ("seed",),
    "checkpoint_every": ("checkpoint_every",),
}


def training_overrides(**options: Any) -> dict[str, Any]:
    """TrainConfig overrides (nested like TrainConfig) from the options that were given."""
    overrides: dict[str, Any] = {}
    for option, value in options.items():
        if value is None:
            continue
        if option == "target_modules":
            value = [t.strip() for t in value.split(",") if t.strip()]
        *parents, leaf = _TRAINING_FIELDS[option]
        node = overrides
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return overrides


def train_config(overrides: dict[str, Any]) -> Any:
    """TrainConfig from overrides; a bad value names its field."""
    from lora_ops.config import TrainConfig

    return checked(lambda: TrainConfig.model_validate(overrides))


def checked(build: Callable[[], T]) -> T:
    """Run a pydantic constructor; its first complaint becomes an InputError with the field."""
    try:
        return build()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InputError(first["msg"], field=field) from None


def point_at_local_stack() -> None:
    """Use the embedded stack's servers when it is up and nothing else is configured."""
    from lora_ops import stack

    for name, value in stack.service_env_if_up().items():
        os.environ.setdefault(name, value)


def secret_value(value: Any) -> str | None:
    return None if value is None else str(value.get_secret_value())
