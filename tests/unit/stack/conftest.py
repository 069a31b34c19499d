"""Settings of a stack that is never started: the stack's pure parts need no servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_ops.settings import OUTSIDE_VARIABLES, Settings


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Defaults, with no outside endpoint, key or admin token, and a state folder of its own."""
    for name in (*OUTSIDE_VARIABLES, "LORA_OPS_ADMIN_TOKEN", "LORA_OPS_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    ports = {"s3_port": 19000, "mlflow_port": 15000, "prefect_port": 14200}
    return Settings().model_copy(update={"state_dir": tmp_path / "state", **ports})
