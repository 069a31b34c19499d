"""The variables each part runs with, and those that point a client shell at the stack.

Secrets stay out of ``ps``: rclone reads its key pair from ``RCLONE_AUTH_KEY`` and MLflow
its S3 keys from ``AWS_*`` variables; ``/proc/<pid>/environ`` is readable only by the same
user. Nothing here logs them.
"""

from __future__ import annotations

import csv
import io
import os
import secrets
import shlex
from pathlib import Path

from lora_ops.settings import OUTSIDE_VARIABLES, Settings, get_settings
from lora_ops.stack.parts import PORT_VARIABLES, SERVICES, StackError, port, url
from lora_ops.stack.state import Record, read_records, state_dir

ADMIN_TOKEN_FILE = "admin-token"
# Variables that point clients elsewhere or carry credentials, and the servers' own state
# and keys: each part gets only its own.
CLIENT_VARIABLES = frozenset((*OUTSIDE_VARIABLES, "PREFECT_HOME", "RCLONE_AUTH_KEY"))


def service_env(settings: Settings | None = None) -> dict[str, str]:
    """Variables that point clients (lora-ops, MLflow, Prefect, boto3) at the stack.

    Ports recorded in ``stack.json`` win over ``settings``, so a shell gets the ports the
    running stack was started on. The S3 keys are the loopback server's dev keys.
    """
    settings = settings or get_settings()
    state = state_dir(settings)
    ports = _ports(settings, read_records(state))
    token = stored_admin_token(settings, state)
    return {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}",
        "AWS_ACCESS_KEY_ID": settings.aws_access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key.get_secret_value(),
        "AWS_DEFAULT_REGION": settings.aws_region,
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
        "LORA_OPS_STATE_DIR": str(state_dir(settings)),
        "LORA_OPS_BUCKET": settings.bucket,
        **{PORT_VARIABLES[name]: str(number) for name, number in ports.items()},
        **({"LORA_OPS_ADMIN_TOKEN": token} if token else {}),
    }


def env_lines(settings: Settings | None = None) -> list[str]:
    """``export NAME=value`` lines for ``eval`` in a shell, each value shell-quoted."""
    return [f"export {name}={shlex.quote(value)}" for name, value in service_env(settings).items()]


def child_env(name: str, settings: Settings, state: Path) -> dict[str, str]:
    """The caller's environment without client settings and keys, plus this part's own."""
    env = {key: value for key, value in os.environ.items() if key not in CLIENT_VARIABLES}
    loopback = "127.0.0.1,localhost"  # the servers talk to each other, never via a proxy
    env["NO_PROXY"] = env["no_proxy"] = ",".join(filter(None, [env.get("NO_PROXY"), loopback]))
    if name == "s3":
        env["RCLONE_AUTH_KEY"] = rclone_auth_key(settings)
    elif name == "mlflow":
        env.update(
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # ~500 MB instead of 1.5 GB
            MLFLOW_S3_ENDPOINT_URL=url("s3", settings),
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
        env["LORA_OPS_ADMIN_TOKEN"] = admin_token(settings, state)
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "5")  # Prefect's 10 s feels stuck here
    return env


def admin_token(settings: Settings, state: Path) -> str:
    """The replicas' admin token: the configured one, else one made for this state folder."""
    token = stored_admin_token(settings, state)
    if token is not None:
        return token
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / ADMIN_TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:  # created 0600: never readable by other users
        handle.write(secrets.token_urlsafe(32))
    return admin_token(settings, state)


def stored_admin_token(settings: Settings, state: Path) -> str | None:
    """The configured admin token, else the one this state folder holds, else None."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = state / ADMIN_TOKEN_FILE
    return path.read_text().strip() if path.is_file() else None


def rclone_auth_key(settings: Settings) -> str:
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


def _ports(settings: Settings, records: dict[str, Record]) -> dict[str, int]:
    """Each server's port: the recorded one while ``up``'s record stands, else the setting."""
    return {
        name: int(records[name]["port"]) if name in records else port(name, settings)
        for name in SERVICES
    }
