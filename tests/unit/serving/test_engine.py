"""The engine's config and its step thread: limits below one are refused before any model
is loaded; the model is loaded and run on the step thread alone."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from lora_ops.errors import InputError
from lora_ops.generation import SamplingParams
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


def test_a_base_that_cannot_load_fails_the_constructor_and_leaves_no_thread(
    tmp_path: Path,
) -> None:
    # The step thread loads the model; its failure must reach the caller, not die with it.
    before = {thread.ident for thread in threading.enumerate()}
    with pytest.raises(InputError, match="not-a-model"):
        Engine(EngineConfig(tmp_path / "not-a-model"))
    assert {thread.ident for thread in threading.enumerate()} <= before


def test_the_model_is_loaded_and_run_on_the_step_thread(tiny_base: Path) -> None:
    engine = Engine(EngineConfig(tiny_base, max_batch_size=2))
    seen: set[int | None] = set()
    hook = engine.model.register_forward_pre_hook(
        lambda *_: seen.add(threading.current_thread().ident)
    )
    try:
        prompt = engine.encode_text("hello there")
        engine.submit(prompt, "base", SamplingParams(max_tokens=3)).result(timeout=120)
    finally:
        hook.remove()
        engine.close()
    assert seen == {engine._worker.ident}
    assert engine._worker.ident != threading.current_thread().ident
