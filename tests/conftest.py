"""Shared fixtures: the tiny-llama base (built once per machine, cached) and its parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lora_ops import base_models


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
