"""Secrets never leave the environment: a full run on a stack of its own, then a grep.

The stack gets S3 keys and an admin token no other test uses; a customer is added,
scheduled, retrained by the stack's worker and deployed to its replica, all through the
real command line. Then every log, every command's output, both servers' databases, the
bucket's files and the processes' command lines are searched for the secrets, and MLflow's
params and tags and Prefect's run parameters are read back through their APIs.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from tests.servers import OUTSIDE_VARIABLES, free_ports

# A whole run on a stack of its own (~2.5 min): make test-slow.
pytestmark = [pytest.mark.integration, pytest.mark.long]
SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"
TRAINING = ["--base", "tiny-llama", "--rank", "4", "--lr", "1e-2", "--max-steps", "4"]
TRAINING += ["--batch-size", "4", "--max-seq-len", "256", "--min-improvement", "0.001"]


class Shell:
    """`python -m lora_ops` with one environment, as an operator's shell would run it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.outputs: list[str] = []

    def __call__(self, *args: str, timeout_s: float = 600) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "lora_ops", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        self.outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, f"lora-ops {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout


@pytest.fixture(scope="module")
def secrets_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Shell, Path, str]]:
    """A stack with its own keys, a customer retrained and deployed on it."""
    state = tmp_path_factory.mktemp("secret-stack")
    secret = f"s3-secret-{uuid.uuid4().hex}"
    env = {key: value for key, value in os.environ.items() if key not in OUTSIDE_VARIABLES}
    ports = free_ports(5)
    env.update(
        LORA_OPS_STATE_DIR=str(state),
        AWS_ACCESS_KEY_ID=f"key-{uuid.uuid4().hex[:8]}",
        AWS_SECRET_ACCESS_KEY=secret,
        LORA_OPS_REPLICA_BASE="tiny-llama",
        **dict(zip(
            ("LORA_OPS_S3_PORT", "LORA_OPS_MLFLOW_PORT", "LORA_OPS_PREFECT_PORT",
             "LORA_OPS_WORKER_PORT", "LORA_OPS_REPLICA_PORT"),
            map(str, ports),
            strict=True,
        )),
    )  # fmt: skip
    env.pop("LORA_OPS_ADMIN_TOKEN", None)  # the stack makes one: that is a secret too
    shell = Shell(env)
    shell("stack", "up", "--worker", "--replica")
    try:
        data = state / "customer.jsonl"
        data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:40]))
        shell("customers", "add", "hush", "--data", str(data), *TRAINING, "--auto-deploy",
              "--schedule", "0 4 * * *")  # fmt: skip
        shell("schedule", "sync")
        ran = shell("pipeline", "run", "--customer", "hush", "--remote")
        assert "Deployed: adapter-hush version 1" in ran
        shell("stack", "status")
        shell("stack", "env")  # prints the secrets on purpose: excluded from the grep below
        yield shell, state, secret
    finally:
        shell("stack", "down")


def secrets_of(state: Path, secret: str) -> list[str]:
    return [secret, (state / "admin-token").read_text().strip()]


def test_no_log_output_or_file_holds_a_secret(secrets_run: tuple[Shell, Path, str]) -> None:
    shell, state, secret = secrets_run
    needles = [value.encode() for value in secrets_of(state, secret)]
    outputs = [out for out in shell.outputs if "export AWS_SECRET_ACCESS_KEY" not in out]
    assert len(outputs) >= 5
    assert not [out[:200] for out in outputs if any(n.decode() in out for n in needles)]
    searched = [
        path
        for path in state.rglob("*")
        if path.is_file() and path.name not in {"admin-token"} and path.stat().st_size < 2**28
    ]
    logs = [path.name for path in searched if path.suffix == ".log"]
    assert {"s3.log", "mlflow.log", "prefect.log", "worker.log", "replica.log"} <= set(logs)
    assert any(path.name == "mlflow.db" for path in searched)
    leaking = [
        str(path.relative_to(state))
        for path in searched
        if any(needle in path.read_bytes() for needle in needles)
    ]
    assert leaking == []  # logs, both databases, the bucket's objects, the service database


def test_mlflow_params_and_prefect_parameters_hold_no_secret(
    secrets_run: tuple[Shell, Path, str],
) -> None:
    shell, state, secret = secrets_run
    secrets = secrets_of(state, secret)
    mlflow = MlflowClient(f"http://127.0.0.1:{shell.env['LORA_OPS_MLFLOW_PORT']}")
    experiment = mlflow.get_experiment_by_name("lora-ops/hush")
    assert experiment is not None
    (run,) = mlflow.search_runs([experiment.experiment_id])
    recorded = [*run.data.params.items(), *run.data.tags.items()]
    for version in mlflow.search_model_versions("name = 'adapter-hush'"):
        recorded += [*version.tags.items(), ("description", version.description or "")]
    assert len(recorded) > 20
    assert not [key for key, value in recorded if any(s in str(value) for s in secrets)]

    prefect = f"http://127.0.0.1:{shell.env['LORA_OPS_PREFECT_PORT']}/api"
    runs = httpx.post(f"{prefect}/flow_runs/filter", json={}).json()
    assert {"retrain", "train-adapter", "deploy"} <= {
        httpx.get(f"{prefect}/flows/{r['flow_id']}").json()["name"] for r in runs
    }
    parameters = [str(r["parameters"]) + str(r.get("job_variables")) for r in runs]
    deployments = httpx.post(f"{prefect}/deployments/filter", json={}).json()
    parameters += [str(d["parameters"]) + str(d.get("job_variables")) for d in deployments]
    assert not [p[:200] for p in parameters if any(s in p for s in secrets)]


def test_processes_do_not_show_secrets_to_ps(secrets_run: tuple[Shell, Path, str]) -> None:
    _, state, secret = secrets_run
    secrets = secrets_of(state, secret)
    shown, ours = [], []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            shown.append(line)
            if cwd == str(state):  # the stack starts its parts in the state folder
                ours.append(line)
    assert len(ours) >= 5  # S3, MLflow, Prefect, the worker and the replica are running
    assert not [line for line in shown if any(s in line for s in secrets)]


def test_the_prefect_database_was_searched_as_text(secrets_run: tuple[Shell, Path, str]) -> None:
    """The byte grep above is only worth something if the database holds readable runs."""
    _, state, _ = secrets_run
    (database,) = (state / "prefect").rglob("prefect.db")
    with sqlite3.connect(database) as connection:
        count = connection.execute("select count(*) from flow_run").fetchone()[0]
    assert count >= 3
    assert b"hush" in database.read_bytes()
