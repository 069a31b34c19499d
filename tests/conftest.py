"""Shared fixtures: the tiny-llama base (built once per machine, cached) and its parts, and
the session's embedded stack (real S3, MLflow and Prefect), started by the first test that
needs it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lora_ops import base_models
from lora_ops import stack as embedded
from lora_ops.settings import Settings
from tests.servers import OUTSIDE_VARIABLES, RunningStack, stack_settings


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """Folder of the tiny-llama base model (materialised in the lora-ops cache)."""
    return base_models.import_base("tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base: Path) -> PreTrainedTokenizerBase:
    return base_models.load_tokenizer(tiny_base)


@pytest.fixture
def tiny_model(tiny_base: Path) -> PreTrainedModel:
    """A fresh tiny-llama on the CPU for each test, so tests can change it freely."""
    return base_models.load_model(tiny_base, device="cpu")


@pytest.fixture(scope="session")
def smollm2_base() -> Path:
    """Folder of the real SmolLM2-135M-Instruct (converted from GGUF once, ~30 s)."""
    return base_models.import_base("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A running stack; the environment points every client at it for the session."""
    with pytest.MonkeyPatch.context() as patch:
        for name in OUTSIDE_VARIABLES:
            patch.delenv(name, raising=False)
        settings = stack_settings(tmp_path_factory.mktemp("stack"))
        state = embedded.up(settings)
        try:
            env = embedded.service_env(settings)
            for name, value in env.items():
                patch.setenv(name, value)
            _refresh_prefect_settings()
            yield RunningStack(
                settings=Settings(),  # as any client in the session will see it
                env=env,
                s3_url=state.url("s3"),
                mlflow_url=state.url("mlflow"),
                prefect_url=state.url("prefect"),
            )
        finally:
            embedded.down(settings)
    _refresh_prefect_settings()


def _refresh_prefect_settings() -> None:
    """Make an already imported Prefect read the environment again.

    Prefect reads its settings once, when it is imported; a test module that imports it at
    collection (tests/flows) would otherwise leave every later flow on an ephemeral server
    instead of the stack's.
    """
    if "prefect" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
