"""The embedded local stack: S3 (rclone), MLflow and Prefect servers on 127.0.0.1, kept
under one state folder.

``<state>/stack.json`` records what ``up`` started (pid, port, url, start time); ``down``
stops only those processes, after checking each pid is still the process it started, so
a recycled pid is never signalled. Data (``s3-data/``, ``mlflow/``, ``prefect/``) stays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from lora_ops.errors import LoraOpsError
from lora_ops.settings import Settings, get_settings

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
ORDER = ("s3", "mlflow", "prefect")  # started in this order, stopped in reverse


class StackError(LoraOpsError):
    """A part of the embedded stack could not be started or stopped."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    url: str
    pid: int | None
    running: bool
    healthy: bool
    detail: str


def _state_dir(settings: Settings) -> Path:
    return settings.state_dir.expanduser().resolve()


def _bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise StackError(f"{name} is not installed (it comes with the project's dependencies)")
    return found


def _urls(settings: Settings) -> dict[str, str]:
    return {
        "s3": f"http://127.0.0.1:{settings.s3_port}",
        "mlflow": f"http://127.0.0.1:{settings.mlflow_port}",
        "prefect": f"http://127.0.0.1:{settings.prefect_port}/api",
    }


def _health_url(name: str, url: str) -> str:
    return {"s3": url + "/", "mlflow": url + "/health", "prefect": url + "/health"}[name]


def service_env(settings: Settings | None = None) -> dict[str, str]:
    """Environment that points clients (lora-ops, MLflow, Prefect, boto3) at the stack."""
    settings = settings or get_settings()
    urls = _urls(settings)
    return {
        "MLFLOW_TRACKING_URI": urls["mlflow"],
        "MLFLOW_S3_ENDPOINT_URL": urls["s3"],
        "AWS_ACCESS_KEY_ID": settings.aws_access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key.get_secret_value(),
        "AWS_DEFAULT_REGION": settings.aws_region,
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "PREFECT_API_URL": urls["prefect"],
        "LORA_OPS_STATE_DIR": str(_state_dir(settings)),
        "LORA_OPS_BUCKET": settings.bucket,
        "LORA_OPS_S3_PORT": str(settings.s3_port),
        "LORA_OPS_MLFLOW_PORT": str(settings.mlflow_port),
        "LORA_OPS_PREFECT_PORT": str(settings.prefect_port),
    }


def env_lines(settings: Settings | None = None) -> list[str]:
    """``export NAME=value`` lines for a shell (the S3 keys are the loopback dev keys)."""
    return [f"export {k}={shlex.quote(v)}" for k, v in service_env(settings).items()]


def service_env_if_up(settings: Settings | None = None) -> dict[str, str]:
    """``service_env`` when the stack in the state folder is up and healthy, else {}."""
    settings = settings or get_settings()
    if not (_state_dir(settings) / STATE_FILE).is_file():
        return {}
    if all(s.healthy for s in status(settings)):
        return service_env(settings)
    return {}


def _commands(settings: Settings, state: Path) -> dict[str, list[str]]:
    python = sys.executable
    return {
        "s3": [
            _bin("rclone"),
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{settings.s3_port}",
            "--vfs-cache-mode",
            "off",
            str(state / "s3-data"),
        ],
        "mlflow": [
            python,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(settings.mlflow_port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{settings.bucket}/mlflow",
            "--serve-artifacts",
        ],
        "prefect": [
            python,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(settings.prefect_port),
        ],
    }


def _process_env(name: str, settings: Settings, state: Path) -> dict[str, str]:
    env = {**os.environ, **service_env(settings)}
    if name == "s3":
        # rclone reads flags from RCLONE_* variables: the keys stay out of `ps` output.
        key = settings.aws_access_key_id.get_secret_value()
        secret = settings.aws_secret_access_key.get_secret_value()
        env["RCLONE_AUTH_KEY"] = f'"{key},{secret}"'  # CSV: one key,secret pair
    if name == "mlflow":
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    if name == "prefect":
        env["PREFECT_HOME"] = str(state / "prefect")
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        env.pop("PREFECT_API_URL", None)
    return env


def _read_state(state: Path) -> dict[str, dict[str, object]]:
    path = state / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(state: Path, records: dict[str, dict[str, object]]) -> None:
    tmp = state / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(records, indent=2) + "\n")
    tmp.replace(state / STATE_FILE)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/pid/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _is_ours(record: dict[str, object]) -> bool:
    pid = int(record["pid"])  # type: ignore[call-overload]
    started = _start_time(pid)
    return started is not None and started == record.get("start_time")


def _healthy(name: str, url: str) -> bool:
    try:
        response = httpx.get(_health_url(name, url), timeout=2.0)
    except httpx.HTTPError:
        return False
    # rclone answers / with 403 to an unsigned request: it is up and enforcing auth.
    return response.status_code < 500 if name == "s3" else response.status_code == 200


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def up(settings: Settings | None = None) -> list[ServiceStatus]:
    """Start whatever part of the stack is not running; idempotent."""
    settings = settings or get_settings()
    state = _state_dir(settings)
    for folder in ("s3-data", "mlflow", "prefect", "logs"):
        (state / folder).mkdir(parents=True, exist_ok=True)
    records = _read_state(state)
    urls = _urls(settings)
    started: list[str] = []
    try:
        for name in ORDER:
            record = records.get(name)
            if record is not None and _is_ours(record) and _healthy(name, urls[name]):
                continue
            records[name] = _start(name, settings, state, urls[name])
            started.append(name)
            _write_state(state, records)
            if name == "s3":
                _create_bucket(settings)
    except BaseException:
        for name in reversed(started):
            _stop(records.pop(name))
        _write_state(state, records)
        raise
    return status(settings)


def _start(name: str, settings: Settings, state: Path, url: str) -> dict[str, object]:
    port = int(url.split(":")[2].split("/")[0])
    if not _port_free(port):
        variable = f"LORA_OPS_{name.upper()}_PORT"
        raise StackError(f"port {port} for {name} is taken by another program; set {variable}")
    log_path = state / "logs" / f"{name}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            _commands(settings, state)[name],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_process_env(name, settings, state),
            start_new_session=True,
            cwd=state,
        )
    record = {
        "pid": process.pid,
        "url": url,
        "port": port,
        "start_time": _start_time(process.pid),
        "log": str(log_path),
    }
    deadline = time.monotonic() + {"s3": 15, "mlflow": 60, "prefect": 90}[name]
    while not _healthy(name, url):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(record)
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise StackError(f"{name} did not start at {url}; its log ends:\n" + "\n".join(tail))
        time.sleep(0.3)
    log.info("%s up at %s (pid %d)", name, url, process.pid)
    return record


def _create_bucket(settings: Settings) -> None:
    from lora_ops.storage import Storage  # boto3's one home

    local = settings.model_copy(update={"s3_endpoint_url": _urls(settings)["s3"]})
    Storage.from_settings(local).ensure_bucket(settings.bucket)


def _stop(record: dict[str, object], timeout_s: float = 10.0) -> bool:
    """Stop one recorded process group: SIGINT, then SIGTERM, then SIGKILL."""
    if not _is_ours(record):
        return False
    pid = int(record["pid"])  # type: ignore[call-overload]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _is_ours(record) or _zombie(pid):
                _reap(pid)
                return True
            time.sleep(0.1)
    return not _is_ours(record)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def down(settings: Settings | None = None) -> list[str]:
    """Stop what ``up`` started (Prefect and MLflow before S3); returns the names stopped."""
    settings = settings or get_settings()
    state = _state_dir(settings)
    records = _read_state(state)
    stopped = []
    for name in reversed(ORDER):
        record = records.pop(name, None)
        if record is not None and _stop(record):
            stopped.append(name)
        if state.is_dir():
            _write_state(state, records)
    return stopped


def status(settings: Settings | None = None) -> list[ServiceStatus]:
    """Each recorded part: is its process alive, does it answer its health check."""
    settings = settings or get_settings()
    records = _read_state(_state_dir(settings))
    rows = []
    for name, url in _urls(settings).items():
        record = records.get(name)
        running = record is not None and _is_ours(record) and not _zombie(int(record["pid"]))  # type: ignore[call-overload]
        healthy = running and _healthy(name, url)
        detail = (
            "not started"
            if record is None
            else "healthy"
            if healthy
            else "process is gone"
            if not running
            else "not answering its health check"
        )
        pid = int(record["pid"]) if record else None  # type: ignore[call-overload]
        rows.append(ServiceStatus(name, url, pid, running, healthy, detail))
    return rows


def as_dicts(rows: list[ServiceStatus]) -> list[dict[str, object]]:
    return [asdict(r) for r in rows]
