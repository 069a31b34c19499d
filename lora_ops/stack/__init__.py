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

What each part is lives in ``parts``, the variables it runs with in ``environment``,
``stack.json`` in ``state``, its processes in ``processes`` and its health checks in
``health``; this module holds the verbs.
"""  # noqa: E501 - PEP 257 wants the summary on one line

from __future__ import annotations

import logging
from pathlib import Path

from lora_ops.settings import Settings, get_settings
from lora_ops.stack import health, processes
from lora_ops.stack.environment import admin_token, env_lines, service_env
from lora_ops.stack.parts import (
    CLIENT_PARTS,
    PARTS,
    PORT_VARIABLES,
    SERVICES,
    StackError,
    port,
    url,
)
from lora_ops.stack.state import (
    STATE_FILE,
    Record,
    ServiceStatus,
    StackState,
    locked,
    read_records,
    state_dir,
    write_records,
)

__all__ = [
    "CLIENT_PARTS",
    "PARTS",
    "PORT_VARIABLES",
    "SERVICES",
    "STATE_FILE",
    "ServiceStatus",
    "StackError",
    "StackState",
    "down",
    "env_lines",
    "service_env",
    "service_env_if_up",
    "status",
    "up",
]

log = logging.getLogger(__name__)

UNHEALTHY_GRACE_S = 5.0  # a part of ours that stays unhealthy this long is restarted by `up`


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
    state = state_dir(settings)
    for folder in ("s3-data", "mlflow", "prefect", "logs"):
        (state / folder).mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    with locked(state):
        # Made now, not with the first replica: `stack env` then exports it, so the replicas,
        # gateways and deploys a user starts from that shell share it.
        admin_token(settings, state)
        records = read_records(state)
        wanted = [*SERVICES, *(["worker"] if worker else []), *(["replica"] if replica else [])]
        _check_ports(settings, records, wanted)
        try:
            for name in wanted:
                if _ensure_running(name, settings, state, records):
                    started.append(name)
                if name == "s3":
                    _create_bucket(settings, url(name, settings))
                if name == "replica":
                    _join_fleet(settings, url(name, settings))
        except BaseException:
            for name in reversed(started):
                processes.stop(records.pop(name))
            write_records(state, records)
            raise
    return StackState(state, tuple(status(settings)), tuple(started))


def down(settings: Settings | None = None) -> list[str]:
    """Stop what ``up`` started (Prefect and MLflow before S3); the data stays.

    Returns:
        The names of the parts that were running and are now stopped.
    """
    settings = settings or get_settings()
    state = state_dir(settings)
    if not (state / STATE_FILE).is_file():
        return []
    stopped = []
    with locked(state):
        records = read_records(state)
        for name in reversed(PARTS):
            record = records.pop(name, None)
            if record is not None and name == "replica":
                _leave_fleet(settings, str(record["url"]))
            if record is not None and processes.stop(record):
                stopped.append(name)
                log.info("stopped %s (pid %s)", name, record["pid"])
            write_records(state, records)
    return stopped


def status(settings: Settings | None = None) -> list[ServiceStatus]:
    """Each part: is the process ``up`` started alive, does it answer its health check."""
    settings = settings or get_settings()
    records = read_records(state_dir(settings))
    shown = [name for name in PARTS if name in SERVICES or name in records]
    return [_service_status(name, records.get(name), settings) for name in shown]


def service_env_if_up(settings: Settings | None = None) -> dict[str, str]:
    """``service_env`` when the stack in the state folder is up and healthy, else {}."""
    settings = settings or get_settings()
    if not (state_dir(settings) / STATE_FILE).is_file():
        return {}
    servers = [part for part in status(settings) if part.name in SERVICES]
    return service_env(settings) if all(part.healthy for part in servers) else {}


def _ensure_running(name: str, settings: Settings, state: Path, records: dict[str, Record]) -> bool:
    """Leave a healthy part of ours alone, else (re)start it; True when it was started."""
    record = records.get(name)
    where = url(name, settings)
    if record is not None and processes.leader_alive(record):
        if int(record["port"]) != port(name, settings):
            raise StackError(
                f"{name} already runs on port {record['port']} (pid {record['pid']}); run "
                f"`lora-ops stack down` first, or set {PORT_VARIABLES[name]}={record['port']}"
            )
        if health.wait_healthy(name, where, None, UNHEALTHY_GRACE_S):
            return False
        log.warning("%s (pid %s) is not answering %s: restarting it", name, record["pid"], where)
    if record is not None:
        processes.stop(record)  # also clears children a dead part left behind, so its port is free
        del records[name]
        write_records(state, records)
    records[name] = processes.start(name, settings, state)
    write_records(state, records)
    return True


def _check_ports(settings: Settings, records: dict[str, Record], wanted: list[str]) -> None:
    """Before anything starts: distinct ports, and each free unless our part holds it."""
    ports = {name: port(name, settings) for name in wanted}
    if len(set(ports.values())) < len(ports):
        raise StackError(f"the stack's parts need different ports, got {ports}")
    for name, number in ports.items():
        record = records.get(name)
        # Our part, or children a dead part left behind, may hold it: `_ensure_running` sorts
        # those out, and `processes.start` checks again.
        if record is None or int(record["port"]) != number or not processes.session_members(record):
            health.check_port_free(name, number)


def _service_status(name: str, record: Record | None, settings: Settings) -> ServiceStatus:
    if record is None:
        return ServiceStatus(name, url(name, settings), None, False, False, "not started")
    where = str(record["url"])
    running = processes.leader_alive(record)
    healthy = running and health.healthy(name, where)
    if healthy:
        detail = "healthy"
    elif running:
        detail = "not answering its health check"
    elif leftovers := processes.session_members(record):
        detail = f"process is gone; {len(leftovers)} child process(es) left (stack up/down)"
    else:
        detail = "process is gone"
    return ServiceStatus(name, where, int(record["pid"]), running, healthy, detail)


def _create_bucket(settings: Settings, s3_url: str) -> None:
    # boto3's one home, with the checksum settings
    from lora_ops.storage import Storage, StorageConfig

    key = settings.aws_access_key_id.get_secret_value()
    secret = settings.aws_secret_access_key.get_secret_value()
    Storage(StorageConfig(s3_url, key, secret, settings.aws_region)).ensure_bucket(settings.bucket)


def _join_fleet(settings: Settings, replica_url: str) -> None:
    from lora_ops.db import Database  # the replicas' table, in the service database
    from lora_ops.fleet import Fleet

    Fleet(Database(settings.database_url)).add(replica_url)


def _leave_fleet(settings: Settings, replica_url: str) -> None:
    from lora_ops.db import Database
    from lora_ops.fleet import Fleet

    Fleet(Database(settings.database_url)).remove(replica_url)
