"""The real servers tests start: free loopback ports and the embedded stack's settings."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from lora_ops.settings import OUTSIDE_VARIABLES as OUTSIDE_VARIABLES  # re-exported for tests
from lora_ops.settings import Settings


def free_port() -> int:
    """A port the kernel just handed out as free (bind to port 0)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports the kernel just handed out as free (bind to port 0)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:  # all bound at once, so the kernel gives distinct ports
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def stack_settings(state_dir: Path) -> Settings:
    """Settings for a stack of our own: its state folder and fresh ports."""
    s3_port, mlflow_port, prefect_port = free_ports(3)
    return Settings(
        state_dir=state_dir,
        s3_port=s3_port,
        mlflow_port=mlflow_port,
        prefect_port=prefect_port,
    )


@dataclass(frozen=True)
class RunningStack:
    """The session's stack: settings read back from the environment it exported."""

    settings: Settings
    env: dict[str, str]
    s3_url: str
    mlflow_url: str
    prefect_url: str  # ends in /api
