"""A part's processes: started in a session of their own, known by identity, stopped together.

A record of ``stack.json`` names a process by pid, boot id and kernel start time, so a
recycled pid is never taken for ours and never signalled; children a part left behind
(MLflow's uvicorn worker) are found by their session id and stopped with it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from lora_ops.settings import Settings
from lora_ops.stack import environment, health, parts
from lora_ops.stack.parts import HEALTH_PATHS, START_TIMEOUT_S, StackError
from lora_ops.stack.state import Record, now

log = logging.getLogger(__name__)

STOP_SIGNALS = ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
_children: dict[int, subprocess.Popen[bytes]] = {}  # kept so our own children can be reaped


def start(name: str, settings: Settings, state: Path) -> Record:
    """Start one part in its own session, logging to logs/<name>.log; wait until healthy.

    Returns:
        The part's record for ``stack.json``.

    Raises:
        StackError: Its port is taken, its program is missing, or it exited or did not
            answer its health check in time (it is stopped again; the message ends with
            its log's tail, secrets redacted).
    """
    port, url = parts.port(name, settings), parts.url(name, settings)
    health.check_port_free(name, port)
    # Looked up on the module at each start, so a test can swap one part's command.
    command = parts.command(name, settings, state)
    log_path = state / "logs" / f"{name}.log"
    with log_path.open("ab") as log_file:
        log_file.write(f"--- lora-ops stack: starting {name} at {now()}\n".encode())
        log_file.flush()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=environment.child_env(name, settings, state),
            cwd=state,
            start_new_session=True,  # its own process group: stopped as one, spared Ctrl+C
        )
    _children[process.pid] = process
    record = _record(process, command, port, url, log_path)
    if not health.wait_healthy(name, url, process, START_TIMEOUT_S[name]):
        message = _start_failure(name, url, process, log_path, settings)
        stop(record)
        raise StackError(message)
    log.info("%s is up at %s (pid %d)", name, url, process.pid)
    return record


def stop(record: Record) -> bool:
    """Stop a part and its children: SIGINT, then SIGTERM, then SIGKILL; True if any ran."""
    leader = int(record["pid"])
    members = session_members(record)
    if not members:
        _reap(leader)
        return False
    for sig, wait_s in STOP_SIGNALS:
        for pid, group in members.items():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                # The leader's group holds the part's children: one signal reaches all.
                if pid == leader:
                    os.killpg(leader, sig)
                elif group != leader or leader not in members:
                    os.kill(pid, sig)
        if _wait_for(lambda: not session_members(record), wait_s):
            break
        members = session_members(record)
    _reap(leader)
    return True


def leader_alive(record: Record) -> bool:
    """Whether the process ``up`` started for the part still runs (not a zombie, not a stranger)."""
    fields = _proc_stat(int(record["pid"]))
    return fields is not None and fields[0] not in "ZX" and _is_ours(record)


def session_members(record: Record) -> dict[int, int]:
    """Live processes (pid -> process group) of the session ``up`` started for a part.

    While any process still has the session id, Linux does not hand that number out as a
    new pid, so members are ours; the start time and executable guard against a session
    that ended and whose number went to someone else's new session.
    """
    leader = int(record["pid"])
    if record.get("boot_id", _boot_id()) != _boot_id() or (
        _proc_stat(leader) is not None and not _is_ours(record)
    ):
        return {}
    since = int(record.get("start_time") or 0)
    members = {}
    for entry in Path("/proc").iterdir():
        fields = _proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is None or fields[0] in "ZX" or int(fields[3]) != leader:
            continue
        if int(fields[19]) >= since and record.get("exe") in (None, _exe(int(entry.name))):
            members[int(entry.name)] = int(fields[2])
    return members


def _record(
    process: subprocess.Popen[bytes], command: list[str], port: int, url: str, log_path: Path
) -> Record:
    fields = _proc_stat(process.pid)
    return {
        "pid": process.pid,
        "port": port,
        "url": url,
        "command": command,  # no secrets: they travel in the environment
        "exe": _exe(process.pid),
        "start_time": int(fields[19]) if fields else None,
        "boot_id": _boot_id(),
        "started_at": now(),
        "log": str(log_path),
    }


def _start_failure(
    name: str, url: str, process: subprocess.Popen[bytes], log_path: Path, settings: Settings
) -> str:
    code = process.poll()
    why = (
        f"exited with code {code}"
        if code is not None
        else f"did not answer {url}{HEALTH_PATHS[name]} within {START_TIMEOUT_S[name]:.0f} s"
    )
    lines = log_path.read_text(errors="replace").splitlines()[-20:]
    tail = "\n".join(lines)
    for secret in (settings.aws_secret_access_key, settings.aws_access_key_id):
        tail = tail.replace(secret.get_secret_value(), "**********")
    return f"{name} {why}; the end of {log_path}:\n{tail}"


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state, ppid, pgrp, session, ...; [19] start."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return text.rsplit(")", 1)[1].split()


@functools.cache
def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _is_ours(record: Record, pid: int | None = None) -> bool:
    """Whether ``pid`` (default: the recorded one) is still the process ``up`` started."""
    fields = _proc_stat(int(record["pid"]) if pid is None else pid)
    if fields is None or record.get("boot_id", _boot_id()) != _boot_id():
        return False
    return fields[19] == str(record.get("start_time"))


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _reap(pid: int) -> None:
    """Collect the exit status of a child of this process, so it leaves no zombie."""
    process = _children.pop(pid, None)
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1)
