"""The real servers: one embedded stack (S3, MLflow, Prefect) per test session, on free ports."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_ops import stack as embedded
from lora_ops.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stack_settings(state_dir: Path) -> Settings:
    return Settings(
        state_dir=state_dir,
        s3_port=free_port(),
        mlflow_port=free_port(),
        prefect_port=free_port(),
    )


@dataclass
class RunningStack:
    settings: Settings
    env: dict[str, str]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A running stack; the environment points every client at it for the session."""
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"):
        os.environ.pop(name, None)
    settings = stack_settings(tmp_path_factory.mktemp("stack"))
    embedded.up(settings)
    env = embedded.service_env(settings)
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield RunningStack(settings=Settings(), env=env)
    finally:
        embedded.down(settings)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
