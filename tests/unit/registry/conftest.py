"""One local SQLite MLflow store per test module, and a guard on MLflow's global state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_ops.registry import Registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """One store for the module (creating MLflow's tables takes ~1 s); one customer a test."""
    store = tmp_path_factory.mktemp("mlflow")
    return Registry(f"sqlite:///{store}/mlflow.db")


@pytest.fixture(autouse=True)
def _no_global_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point MLflow's *global* tracking URI at a decoy: the registry must never touch it."""
    decoy = tmp_path / "global" / "mlflow.db"
    decoy.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{decoy}")
    monkeypatch.chdir(decoy.parent)
    yield
    assert not decoy.exists(), "something used MLflow's global tracking URI"
