"""The engine's config: limits below one are refused before any model is loaded."""

from __future__ import annotations

import dataclasses

import pytest

from lora_ops.errors import InputError
from lora_ops.serving.engine import Engine, EngineConfig


@pytest.mark.parametrize("limit", ["max_adapters", "max_batch_size", "max_queue"])
def test_an_engine_refuses_a_limit_below_one(limit: str) -> None:
    config = dataclasses.replace(EngineConfig("no-such-base"), **{limit: 0})
    with pytest.raises(InputError, match="must be >= 1"):
        Engine(config)


def test_an_engine_config_is_frozen() -> None:
    config = EngineConfig("no-such-base")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_queue = 1  # type: ignore[misc]
