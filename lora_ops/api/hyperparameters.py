"""A job's hyperparameters, OpenAI's names on the outside, a TrainConfig on the inside.

OpenAI's three (``n_epochs``, ``batch_size``, ``learning_rate_multiplier``, each a value or
``"auto"``) map to ``epochs``, ``batch_size`` and ``learning_rate``; any other
TrainConfig field (``max_steps``, ``max_seq_len``, ``packing``, ``checkpoint_every``,
``lora`` as ``{"r", "alpha", "target_modules", ...}``) may ride beside them as lora-ops'
own extra fields. Anything else is refused by name: nothing a client sends is dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from lora_ops.config import AUTO, TrainConfig
from lora_ops.errors import InputError

OPENAI_NAMES = ("n_epochs", "batch_size", "learning_rate_multiplier")
# Fields that OpenAI's names set, or that the job sets from elsewhere (the seed is a top-level
# field of the request; warm starts are a customer's record, not a job's).
_NOT_EXTRA = {"epochs", "batch_size", "learning_rate", "seed"}
MAX_LR_MULTIPLIER = 100.0


def train_config(
    hyperparameters: Mapping[str, Any],
    base_config: TrainConfig,
    seed: int,
    where: str,
) -> tuple[TrainConfig, dict[str, Any]]:
    """The run's TrainConfig and OpenAI's hyperparameters as resolved (no "auto" left but
    ``n_epochs``, which the example count decides when training starts).

    Args:
        hyperparameters: the request's, OpenAI's names and lora-ops' extra fields.
        base_config: the customer's record's config, which the job's values override.
        seed: the job's seed.
        where: the request field holding ``hyperparameters``, for error messages.

    Raises:
        InputError: an unknown name or a value out of range, naming the field.
    """
    values = dict(hyperparameters)
    overrides: dict[str, Any] = {"seed": seed}
    if "n_epochs" in values:
        overrides["epochs"] = values.pop("n_epochs")
    batch_size = values.pop("batch_size", AUTO)
    if batch_size != AUTO:
        overrides["batch_size"] = batch_size
    multiplier = _multiplier(values.pop("learning_rate_multiplier", AUTO), where)
    overrides["learning_rate"] = base_config.learning_rate * multiplier
    for name, value in values.items():
        if name not in TrainConfig.model_fields or name in _NOT_EXTRA:
            known = [*OPENAI_NAMES, *sorted(set(TrainConfig.model_fields) - _NOT_EXTRA)]
            raise InputError(
                f"unknown hyperparameter {name!r}; known: {', '.join(known)}",
                field=f"{where}.{name}",
            )
        overrides[name] = value
    merged = base_config.model_dump() | overrides
    if "lora" in values:  # a partial LoRA spec changes only the fields it names
        merged["lora"] = dataclasses.asdict(base_config.lora) | dict(values["lora"])
    config = _validated(merged, where)
    resolved = {
        "n_epochs": config.epochs,
        "batch_size": config.batch_size,
        "learning_rate_multiplier": multiplier,
    }
    return config, resolved


def _multiplier(value: Any, where: str) -> float:
    if value == AUTO:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(
            f"must be a number or 'auto'; got {value!r}", field=f"{where}.learning_rate_multiplier"
        )
    if not 0 < value <= MAX_LR_MULTIPLIER:
        raise InputError(
            f"must be above 0 and at most {MAX_LR_MULTIPLIER:g}; got {value!r}",
            field=f"{where}.learning_rate_multiplier",
        )
    return float(value)


_RENAMED = {"epochs": "n_epochs", "learning_rate": "learning_rate_multiplier"}


def _validated(values: Mapping[str, Any], where: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        path = [str(part) for part in error["loc"]]
        if path and path[0] in _RENAMED:
            path[0] = _RENAMED[path[0]]
        raise InputError(error["msg"], field=".".join([where, *path])) from None
