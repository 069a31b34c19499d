"""The embedded stack: idempotent up, real S3/MLflow/Prefect, truthful status, clean down."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from mlflow import MlflowClient
from typer.testing import CliRunner

from lora_ops import stack as embedded
from lora_ops.cli import app
from lora_ops.db import Database
from lora_ops.fleet import Fleet
from lora_ops.settings import Settings
from lora_ops.stack import environment, parts
from tests.integration.conftest import OUTSIDE_VARIABLES, RunningStack, free_ports, stack_settings

pytestmark = pytest.mark.integration
runner = CliRunner()


def stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in "ZX"


def session_of(leader: int) -> list[int]:
    """Live processes in the session ``leader`` started (it and its children)."""
    members = []
    for entry in Path("/proc").iterdir():
        fields = stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields and fields[0] not in "ZX" and int(fields[3]) == leader:
            members.append(int(entry.name))
    return members


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def s3_client(settings: Settings, endpoint_url: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=settings.aws_access_key_id.get_secret_value(),
        aws_secret_access_key=settings.aws_secret_access_key.get_secret_value(),
        region_name=settings.aws_region,
        config=Config(
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
            retries={"mode": "standard", "max_attempts": 3},
        ),
    )


def pids(settings: Settings | None = None) -> dict[str, int | None]:
    return {row.name: row.pid for row in embedded.status(settings)}


# -- the session's stack ---------------------------------------------------------------------


def test_up_again_keeps_the_same_processes(stack: RunningStack) -> None:
    before = pids(stack.settings)
    again = embedded.up(stack.settings)
    assert again.started == ()
    assert {row.name: row.pid for row in again.services} == before
    assert again.healthy
    assert all(row.running and row.detail == "healthy" for row in again.services)


def test_the_bucket_exists(stack: RunningStack) -> None:
    s3 = s3_client(stack.settings, stack.s3_url)
    assert stack.settings.bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_mlflow_artifacts_land_in_the_bucket(stack: RunningStack, tmp_path: Path) -> None:
    assert httpx.get(f"{stack.mlflow_url}/health").status_code == 200
    client = MlflowClient(tracking_uri=stack.mlflow_url)
    experiment = client.create_experiment(f"stack-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment)
    note = tmp_path / "note.txt"
    note.write_text("kept in S3")
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)

    s3 = s3_client(stack.settings, stack.s3_url)
    listing = s3.list_objects_v2(Bucket=stack.settings.bucket, Prefix="mlflow/")
    keys = [item["Key"] for item in listing.get("Contents", [])]
    key = next(k for k in keys if k.endswith(f"/{run.info.run_id}/artifacts/note.txt"))
    body = s3.get_object(Bucket=stack.settings.bucket, Key=key)["Body"].read()
    assert body == b"kept in S3"


def test_prefect_answers(stack: RunningStack) -> None:
    response = httpx.get(f"{stack.prefect_url}/health")
    assert response.status_code == 200
    assert response.json() is True


def test_env_lines_export_the_stack(stack: RunningStack) -> None:
    lines = embedded.env_lines(stack.settings)
    assert all(line.startswith("export ") for line in lines)
    exported = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in lines)
    assert exported == stack.env
    assert exported["MLFLOW_TRACKING_URI"] == stack.mlflow_url
    assert exported["MLFLOW_S3_ENDPOINT_URL"] == stack.s3_url
    assert exported["PREFECT_API_URL"] == stack.prefect_url
    assert exported["LORA_OPS_PREFECT_PORT"] == str(stack.settings.prefect_port)
    assert exported["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_required"
    # a shell's eval of `lora-ops stack env` sees the same values
    printed = runner.invoke(app, ["stack", "env"])
    assert printed.exit_code == 0, printed.output
    script = printed.output + 'printf "%s\\n" "$MLFLOW_TRACKING_URI" "$LORA_OPS_STATE_DIR"\n'
    shell = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert shell.stdout.split() == [stack.mlflow_url, stack.env["LORA_OPS_STATE_DIR"]]


def test_the_session_environment_points_at_the_stack(stack: RunningStack) -> None:
    assert os.environ["MLFLOW_TRACKING_URI"] == stack.mlflow_url
    assert os.environ["PREFECT_API_URL"] == stack.prefect_url
    assert stack.settings.s3_endpoint_url == stack.s3_url
    assert stack.settings.mlflow_tracking_uri == stack.mlflow_url
    assert embedded.service_env_if_up() == stack.env


def test_secrets_stay_out_of_logs_and_ps(stack: RunningStack) -> None:
    secret = stack.settings.aws_secret_access_key.get_secret_value()
    logs = sorted((Path(stack.env["LORA_OPS_STATE_DIR"]) / "logs").glob("*.log"))
    assert [p.name for p in logs] == ["mlflow.log", "prefect.log", "s3.log"]
    assert not [p.name for p in logs if secret in p.read_text(errors="replace")]
    processes = [pid for leader in pids(stack.settings).values() for pid in session_of(leader or 0)]
    assert len(processes) >= 3
    assert not [pid for pid in processes if secret in cmdline(pid)]


# -- stacks of their own: refusals and faults -------------------------------------------------


@pytest.fixture
def own_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A separate stack's settings, also in the environment (as the CLI reads them)."""
    for name in OUTSIDE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    settings = stack_settings(tmp_path / "state")
    monkeypatch.setenv("LORA_OPS_STATE_DIR", str(settings.state_dir))
    for name in ("s3", "mlflow", "prefect"):
        monkeypatch.setenv(f"LORA_OPS_{name.upper()}_PORT", str(getattr(settings, f"{name}_port")))
    return settings


def test_a_taken_port_is_refused_naming_its_variable(own_env: Settings) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = own_env.model_copy(update={"mlflow_port": port})
        with pytest.raises(embedded.StackError, match=f"port {port} .*LORA_OPS_MLFLOW_PORT"):
            embedded.up(settings)
    assert not (own_env.state_dir / "stack.json").exists()  # checked before anything started


def test_a_part_that_dies_at_start_is_reported_and_rolled_back(
    own_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_command = parts.command
    crash = "import os, sys; print('boom', os.environ['AWS_SECRET_ACCESS_KEY']); sys.exit(3)"

    def command(name: str, settings: Settings, state: Path) -> list[str]:
        if name == "mlflow":
            return [sys.executable, "-c", crash]
        return real_command(name, settings, state)

    monkeypatch.setattr(parts, "command", command)
    with pytest.raises(embedded.StackError) as raised:
        embedded.up(own_env)
    message = str(raised.value)
    assert "mlflow exited with code 3" in message
    assert "boom **********" in message  # the log's tail, secret redacted
    assert own_env.aws_secret_access_key.get_secret_value() not in message
    assert [row.detail for row in embedded.status(own_env)] == ["not started"] * 3
    state = str(own_env.state_dir)  # the S3 server this call started is stopped again
    others = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    assert not [pid for pid in others if alive(pid) and f"{state}/s3-data" in cmdline(pid)]


def test_a_recycled_pid_is_never_signalled(own_env: Settings) -> None:
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        url = f"http://127.0.0.1:{own_env.s3_port}"
        record = {"pid": stranger.pid, "port": own_env.s3_port, "url": url, "start_time": 1}
        own_env.state_dir.mkdir(parents=True)
        (own_env.state_dir / "stack.json").write_text(json.dumps({"s3": record}))
        s3 = embedded.status(own_env)[0]
        assert (s3.pid, s3.running, s3.healthy, s3.detail) == (
            stranger.pid,
            False,
            False,
            "process is gone",
        )
        assert embedded.down(own_env) == []
        assert alive(stranger.pid)
        assert not (own_env.state_dir / "stack.json").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_status_tells_the_truth_and_down_leaves_nothing(
    own_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORA_OPS_ADMIN_TOKEN", raising=False)  # the stack makes its own
    started = runner.invoke(app, ["stack", "up"])
    assert started.exit_code == 0, started.output
    assert "MLflow UI:  http://127.0.0.1:" in started.output
    first = pids()
    leaders = [pid for pid in first.values() if pid]
    assert len(leaders) == 3
    assert all(alive(pid) for pid in leaders)
    try:
        assert runner.invoke(app, ["stack", "status"]).exit_code == 0
        # The admin token exists from the start, so `stack env` hands it to what the user
        # starts next (replicas, a gateway, deploys) and they agree.
        token = (own_env.state_dir / "admin-token").read_text()
        assert embedded.service_env()["LORA_OPS_ADMIN_TOKEN"] == token

        os.kill(first["s3"] or 0, signal.SIGKILL)  # S3 dies
        assert wait_until(lambda: not alive(first["s3"] or 0))
        assert runner.invoke(app, ["stack", "status"]).exit_code == 1
        truth = {row.name: (row.running, row.healthy) for row in embedded.status()}
        assert truth == {"s3": (False, False), "mlflow": (True, True), "prefect": (True, True)}
        assert embedded.status()[0].detail == "process is gone"

        mlflow_children = [
            pid for pid in session_of(first["mlflow"] or 0) if pid != first["mlflow"]
        ]
        assert mlflow_children  # uvicorn, which outlives a killed `mlflow server`
        os.kill(first["mlflow"] or 0, signal.SIGKILL)
        assert wait_until(lambda: not alive(first["mlflow"] or 0))
        mlflow = embedded.status()[1]
        assert (mlflow.running, mlflow.healthy) == (False, False)
        assert "child process(es) left" in mlflow.detail

        again = runner.invoke(app, ["stack", "up"])  # brings back only what died
        assert again.exit_code == 0, again.output
        assert "started: s3, mlflow" in again.output
        second = pids()
        assert second["prefect"] == first["prefect"]
        assert second["s3"] != first["s3"]
        assert second["mlflow"] != first["mlflow"]
        assert not [pid for pid in mlflow_children if alive(pid)]
        assert all(row.healthy for row in embedded.status())
    finally:
        stopped = runner.invoke(app, ["stack", "down"])
    assert stopped.exit_code == 0, stopped.output
    assert "stopped: prefect, mlflow, s3" in stopped.output
    every = [*leaders, *(pid for pid in second.values() if pid)]
    assert not [pid for pid in every if alive(pid) or session_of(pid)]
    assert "nothing was running" in runner.invoke(app, ["stack", "down"]).output
    assert (
        runner.invoke(app, ["stack", "status"]).exit_code == 0
    )  # nothing recorded, nothing broken


def test_a_worker_and_a_replica_join_the_stack(
    own_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_port, replica_port = free_ports(2)
    monkeypatch.setenv("LORA_OPS_WORKER_PORT", str(worker_port))
    monkeypatch.setenv("LORA_OPS_REPLICA_PORT", str(replica_port))
    monkeypatch.setenv("LORA_OPS_REPLICA_BASE", "tiny-llama")
    monkeypatch.delenv("LORA_OPS_ADMIN_TOKEN", raising=False)
    replica = f"http://127.0.0.1:{replica_port}"
    started = runner.invoke(app, ["stack", "up", "--worker", "--replica"])
    try:
        assert started.exit_code == 0, started.output
        assert f"Replica:    {replica}/v1" in started.output
        parts = {row.name: row for row in embedded.status()}
        assert [name for name, row in parts.items() if row.healthy] == list(embedded.PARTS)
        token_file = own_env.state_dir / "admin-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text()
        assert embedded.service_env()["LORA_OPS_ADMIN_TOKEN"] == token
        assert Fleet(Database()).urls() == [replica]

        body = {"lora_name": "x", "lora_path": "/nowhere"}
        assert httpx.post(f"{replica}/v1/load_lora_adapter", json=body).status_code == 401
        authorised = {"Authorization": f"Bearer {token}"}
        loaded = httpx.post(f"{replica}/v1/load_lora_adapter", json=body, headers=authorised)
        assert loaded.status_code == 400  # past the token check: the path does not exist
        prefect = embedded.service_env()["PREFECT_API_URL"]
        workers = httpx.post(f"{prefect}/work_pools/{own_env.work_pool}/workers/filter").json()
        assert [w["status"] for w in workers] == ["ONLINE"]

        again = runner.invoke(app, ["stack", "up", "--worker", "--replica"])
        assert "started: nothing" in again.output
    finally:
        stopped = runner.invoke(app, ["stack", "down"])
    assert "stopped: replica, worker, prefect, mlflow, s3" in stopped.output
    assert Fleet(Database()).urls() == []


def test_the_callers_client_settings_never_reach_the_stacks_parts(
    own_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shell pointed at another S3 (or MLflow, or Prefect) must not redirect the stack's
    # worker and replica: they talk to the stack's own servers only.
    elsewhere = {
        "LORA_OPS_S3_ENDPOINT_URL": "http://s3.elsewhere.invalid:9000",
        "AWS_ENDPOINT_URL": "http://aws.elsewhere.invalid",
        "AWS_ACCESS_KEY_ID": "someone-elses-key",
        "MLFLOW_TRACKING_URI": "http://mlflow.elsewhere.invalid",
        "PREFECT_API_URL": "http://prefect.elsewhere.invalid/api",
    }
    for name, value in elsewhere.items():
        monkeypatch.setenv(name, value)
    for part in ("worker", "replica", "mlflow", "prefect", "s3"):
        env = environment.child_env(part, own_env, own_env.state_dir)
        leaked = {name: env[name] for name in elsewhere if env.get(name) == elsewhere[name]}
        assert leaked == {}, part
    env = environment.child_env("worker", own_env, own_env.state_dir)
    with monkeypatch.context() as child:
        for name in OUTSIDE_VARIABLES:
            child.delenv(name, raising=False)
        for name, value in env.items():
            child.setenv(name, value)
        seen = Settings()
    assert seen.s3_endpoint_url == f"http://127.0.0.1:{own_env.s3_port}"
    assert seen.mlflow_tracking_uri == f"http://127.0.0.1:{own_env.mlflow_port}"
