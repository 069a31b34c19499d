"""The state folder and its ``stack.json``: what ``up`` started, and what runs now.

``stack.json`` holds one record per part ``up`` started: pid, port, url, command, log and
the pid's identity (boot id, kernel start time, executable). It is replaced atomically, and
``up`` and ``down`` hold a lock on the folder while they read and change it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_ops.settings import Settings
from lora_ops.stack.parts import PARTS, StackError

STATE_FILE = "stack.json"
Record = dict[str, Any]  # one service's entry in stack.json


@dataclass(frozen=True)
class ServiceStatus:
    """One part of the stack as it is now.

    Attributes:
        name: ``s3``, ``mlflow`` or ``prefect``.
        url: Where clients reach it (Prefect's ends in ``/api``).
        pid: The recorded process id; None when ``up`` never started it.
        running: The process ``up`` started is alive (not merely some process with its pid).
        healthy: Running, and its health endpoint answered.
        detail: One line for people: ``healthy``, ``not started``, ``process is gone``, ...
    """

    name: str
    url: str
    pid: int | None
    running: bool
    healthy: bool
    detail: str


@dataclass(frozen=True)
class StackState:
    """What ``up`` left behind: every part's status, and which parts this call started."""

    state_dir: Path
    services: tuple[ServiceStatus, ...]
    started: tuple[str, ...]

    @property
    def healthy(self) -> bool:
        return all(service.healthy for service in self.services)

    def url(self, name: str) -> str:
        """The URL of the part called ``name``."""
        return next(service.url for service in self.services if service.name == name)


def state_dir(settings: Settings) -> Path:
    """The state folder, absolute."""
    return settings.state_dir.expanduser().resolve()


def read_records(state: Path) -> dict[str, Record]:
    """The parts ``stack.json`` records (entries that are not a part's record are skipped).

    Raises:
        StackError: The file is not valid JSON.
    """
    path = state / STATE_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StackError(f"{path} is not valid JSON ({exc}); stop its servers by hand") from None
    return {
        name: record
        for name, record in raw.items()
        if name in PARTS and isinstance(record, dict) and "pid" in record and "port" in record
    }


def write_records(state: Path, records: dict[str, Record]) -> None:
    """Replace stack.json atomically (a reader sees the old or the new file, never half)."""
    path = state / STATE_FILE
    if not records:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(records, indent=2) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def locked(state: Path) -> Iterator[None]:
    """Serialise ``up`` and ``down`` on one state folder across processes."""
    with (state / ".stack.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def now() -> str:
    """The time as ``stack.json`` and the logs write it: UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")
