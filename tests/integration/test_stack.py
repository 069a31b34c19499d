"""The embedded stack: idempotent up, truthful status, down leaves nothing running."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from lora_ops import stack as embedded
from lora_ops.cli import app
from lora_ops.storage import Storage
from tests.integration.conftest import stack_settings

pytestmark = pytest.mark.integration
runner = CliRunner()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_up_is_idempotent_and_everything_answers(stack: Any) -> None:
    settings = stack.settings
    before = {row.name: row.pid for row in embedded.status(settings)}
    again = {row.name: row.pid for row in embedded.up(settings)}
    assert again == before
    assert all(row.healthy for row in embedded.status(settings))
    assert Storage.from_settings(settings).list_keys(f"s3://{settings.bucket}/") is not None
    assert httpx.get(stack.env["MLFLOW_TRACKING_URI"] + "/health").status_code == 200
    assert httpx.get(stack.env["PREFECT_API_URL"] + "/health").status_code == 200


def test_env_lines_point_at_the_stack(stack: Any) -> None:
    lines = embedded.env_lines(stack.settings)
    exported = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    assert exported["MLFLOW_TRACKING_URI"] == stack.env["MLFLOW_TRACKING_URI"]
    assert exported["PREFECT_API_URL"].endswith("/api")
    assert exported["LORA_OPS_BUCKET"] == stack.settings.bucket


def test_secret_never_reaches_the_logs(stack: Any) -> None:
    secret = stack.settings.aws_secret_access_key.get_secret_value()
    logs = Path(stack.env["LORA_OPS_STATE_DIR"]) / "logs"
    texts = [p.read_text(errors="replace") for p in logs.glob("*.log")]
    assert texts
    assert not any(secret in text for text in texts)


def test_status_tells_the_truth_and_down_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = stack_settings(tmp_path / "state")
    for name, value in {
        "LORA_OPS_STATE_DIR": str(settings.state_dir),
        "LORA_OPS_S3_PORT": str(settings.s3_port),
        "LORA_OPS_MLFLOW_PORT": str(settings.mlflow_port),
        "LORA_OPS_PREFECT_PORT": str(settings.prefect_port),
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)
    try:
        started = runner.invoke(app, ["stack", "up"])
        assert started.exit_code == 0, started.output
        assert "MLflow UI" in started.output
        pids = {row.name: row.pid for row in embedded.status()}
        assert all(pid is not None and alive(pid) for pid in pids.values())
        assert runner.invoke(app, ["stack", "status"]).exit_code == 0

        os.kill(pids["s3"], signal.SIGKILL)
        time.sleep(0.5)
        broken = runner.invoke(app, ["stack", "status"])
        assert broken.exit_code == 1
        assert "process is gone" in broken.output
        assert {r.name: r.healthy for r in embedded.status()} == {
            "s3": False,
            "mlflow": True,
            "prefect": True,
        }
    finally:
        stopped = runner.invoke(app, ["stack", "down"])
    assert stopped.exit_code == 0
    assert "mlflow" in stopped.output
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids.values() if pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [name for name, pid in pids.items() if pid and alive(pid)]
    assert "nothing was running" in runner.invoke(app, ["stack", "down"]).output
