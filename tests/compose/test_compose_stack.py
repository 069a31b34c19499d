"""docker-compose.yml run for real: the whole default stack from empty volumes, driven the way
a user drives it, then taken down with nothing of it left behind.

`make test-compose` (marker ``compose``; not part of `make test`). The image is built by
Compose when it is missing; rebuild it after a change to the code, the Dockerfile or the
dependencies (`docker compose build`). Each step prints what it did and how long it took.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import openai
import pytest
from botocore.config import Config

from tests.compose.engine import Engine, compose_binary, find_engine
from tests.servers import free_ports

pytestmark = pytest.mark.compose

ROOT = Path(__file__).parents[2]
SAMPLE = ROOT / "examples" / "acme-support.jsonl"
CUSTOMER = "compose-co"
ONE_SHOT = {"bucket-init", "db-migrate", "schedule-sync", "fleet-init"}
LONG_RUNNING = {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker", "serve-0"}
LONG_RUNNING |= {"serve-1", "api"}
PORTS = ("POSTGRES", "MLFLOW", "PREFECT", "MINIO", "MINIO_CONSOLE", "SERVE_0", "SERVE_1", "API")
T0 = time.monotonic()


def step(text: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {text}", flush=True)


def read_env(path: Path) -> dict[str, str]:
    """The variables a shell gets from `set -a; . FILE; set +a`, as a user on the host."""
    script = f"set -a; . {path}; set +a; env -0"
    raw = subprocess.run(["bash", "-c", script], capture_output=True, check=True, env={}).stdout
    pairs = (item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    return {k: v for k, v in pairs if k not in {"PWD", "SHLVL", "_", "OLDPWD"}}


class Stack:
    """The compose project ``name`` with the settings of ``env_file``."""

    def __init__(self, engine: Engine, name: str, env_file: Path) -> None:
        self.engine = engine
        self.name = name
        self.env_file = env_file
        self.env = read_env(env_file)
        self.base = [str(compose_binary()), "-p", name, "-f", str(ROOT / "docker-compose.yml")]
        self.base += ["--env-file", str(env_file)]

    def compose(
        self, *args: str, timeout_s: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DOCKER_HOST": self.engine.docker_host}
        for name in self.env:  # the host's client variables are not the containers'
            env.pop(name, None)
        done = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=timeout_s, env=env
        )
        if check:
            assert done.returncode == 0, f"compose {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done

    def exec(self, service: str, *command: str, timeout_s: float = 300) -> str:
        return self.compose("exec", "-T", service, *command, timeout_s=timeout_s).stdout

    def services(self) -> dict[str, dict[str, Any]]:
        listing = self.compose("ps", "-a", "--format", "json").stdout
        rows = [json.loads(line) for line in listing.splitlines() if line.strip()]
        if len(rows) == 1 and isinstance(rows[0], list):
            rows = rows[0]
        return {row["Service"]: row for row in rows}

    def wait_healthy(self, service: str, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while (state := self.services()[service])["Health"] != "healthy":
            assert time.monotonic() < deadline, f"{service}: {state}"
            time.sleep(2)

    def url(self, port: str) -> str:
        return f"http://127.0.0.1:{self.env[f'{port}_PORT']}"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    found = find_engine(tmp_path_factory.mktemp("engine"))
    try:
        yield found
    finally:
        found.close()


@pytest.fixture(scope="module")
def stack(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack up from empty volumes with its own secrets and host ports; down -v after."""
    folder = tmp_path_factory.mktemp("compose")
    ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
    example = (ROOT / ".env.example").read_text()
    lines = []
    for line in example.splitlines():
        name, _, value = line.partition("=")
        if name.endswith("_PORT") and name.removesuffix("_PORT") in ports:
            value = str(ports[name.removesuffix("_PORT")])
        elif name.endswith(("PASSWORD", "_TOKEN")):
            value = secrets.token_hex(16)
        elif name == "LORA_OPS_BASE_MODEL":
            value = "tiny-llama"  # loads in a second; the pipeline is the point here
        lines.append(f"{name}={value}" if _ else line)
    env_file = folder / ".env"
    env_file.write_text("\n".join(lines) + "\n")
    running = Stack(engine, f"loraops-test-{secrets.token_hex(3)}", env_file)
    step(f"engine at {engine.docker_host} (podman: {engine.is_podman()}), project {running.name}")
    try:
        yield running
    finally:
        step("down -v")
        down = running.compose("down", "-v", "-t", "30", timeout_s=300, check=False)
        step(f"down -v: rc {down.returncode}")
        print(down.stderr[-2000:])


def upload_data(stack: Stack) -> str:
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"],
        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        config=Config(response_checksum_validation="when_required"),
    )
    key = f"uploads/{CUSTOMER}.jsonl"
    body = "".join(SAMPLE.read_text().splitlines(keepends=True)[:120])
    s3.put_object(Bucket=stack.env["LORA_OPS_BUCKET"], Key=key, Body=body.encode())
    return f"s3://{stack.env['LORA_OPS_BUCKET']}/{key}"


def prefect_call(stack: Stack, method: str, path: str, **kwargs: Any) -> Any:
    response = httpx.request(method, stack.env["PREFECT_API_URL"] + path, timeout=60, **kwargs)
    response.raise_for_status()
    return response.json()


def host_python(stack: Stack, code: str, timeout_s: float = 180) -> str:
    """``code`` in a fresh interpreter on the host with the .env's variables, as a user."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **stack.env},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def ask(url: str, model: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120)
    assert model in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the Anvil Club?"}],
        max_tokens=8, temperature=0,
    )  # fmt: skip
    assert reply.choices[0].finish_reason in {"stop", "length"}
    return reply.choices[0].message.content or ""


def test_the_stack_runs_a_customer_from_data_to_answers(stack: Stack, engine: Engine) -> None:
    step("up -d --wait (the image is built when missing)")
    up = stack.compose("up", "-d", "--wait", "--wait-timeout", "900", timeout_s=2400, check=False)
    services = stack.services()
    assert up.returncode == 0, up.stderr[-4000:] + json.dumps(services, indent=1)[-4000:]
    for name in LONG_RUNNING:
        assert (services[name]["State"], services[name]["Health"]) == ("running", "healthy")
    for name in ONE_SHOT:
        assert (services[name]["State"], services[name]["ExitCode"]) == ("exited", 0), name
    step(f"up: every service healthy, one-shot jobs exited 0: {sorted(services)}")

    uri = upload_data(stack)
    step(f"uploaded the customer's data from the host to {uri}")
    training = ["--base", "tiny-llama", "--rank", "8", "--lr", "1e-2", "--max-steps", "8"]
    training += ["--batch-size", "4", "--max-seq-len", "256", "--min-improvement", "0.001"]
    added = stack.exec("prefect-worker", "lora-ops", "customers", "add", CUSTOMER, "--data",
                       uri, *training, "--auto-deploy")  # fmt: skip
    step(f"customers add (in the worker container): {added.strip()}")
    synced = stack.exec("prefect-worker", "lora-ops", "schedule", "sync")
    assert f"applied retrain/{CUSTOMER}" in synced
    step("schedule sync: deployment retrain/compose-co")

    deployment = prefect_call(stack, "GET", f"/deployments/name/retrain/{CUSTOMER}")
    run = prefect_call(stack, "POST", f"/deployments/{deployment['id']}/create_flow_run",
                       json={"parameters": {}})  # fmt: skip
    step(f"retrain triggered through Prefect's REST API from the host: flow run {run['id']}")
    deadline = time.monotonic() + 900
    while run["state"]["type"] not in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
        assert time.monotonic() < deadline, run["state"]
        time.sleep(3)
        run = prefect_call(stack, "GET", f"/flow_runs/{run['id']}")
    worker_log = stack.compose("logs", "prefect-worker", check=False).stdout[-6000:]
    assert (run["state"]["type"], run["state"]["name"]) == ("COMPLETED", "Deployed"), worker_log
    step(f"retrain: {run['state']['name']} in {run['total_run_time']:.0f} s of run time")

    # MLflow (on Postgres) from the host, with the .env's variables: the version, its
    # aliases, and its files, downloaded through the tracking server.
    version = json.loads(host_python(stack, f"""
import json, mlflow
client = mlflow.MlflowClient()
version = client.get_model_version_by_alias("adapter-{CUSTOMER}", "production")
print(json.dumps({{"version": version.version, "aliases": list(version.aliases),
                   "source": version.source}}))
"""))  # fmt: skip
    assert version["version"] == "1", version
    assert "production" in version["aliases"], version
    files = host_python(stack, f"""
import os, tempfile
from lora_ops.registry import Registry
folder = Registry().download_adapter(("{CUSTOMER}", "production"), tempfile.mkdtemp())
print(sorted(os.listdir(folder)))
""")  # fmt: skip
    assert "adapter_model.safetensors" in files, files
    assert "adapter_config.json" in files, files
    step(f"MLflow from the host: adapter-{CUSTOMER} version 1 (production), files {files.strip()}")
    stored = stack.exec("postgres", "psql", "-U", stack.env["POSTGRES_USER"], "-d", "mlflow",
                        "-tAc", "SELECT name, version FROM model_versions")  # fmt: skip
    assert f"adapter-{CUSTOMER}|1" in stored
    step(f"MLflow's registry lives in Postgres: {stored.strip()}")
    listing = host_python(stack, f"""
import boto3
s3 = boto3.client("s3")
pages = s3.get_paginator("list_objects_v2").paginate(Bucket="{stack.env["LORA_OPS_BUCKET"]}")
print("\\n".join(o["Key"] for page in pages for o in page.get("Contents", [])))
""")  # fmt: skip
    weights = [key for key in listing.split() if key.endswith("adapter_model.safetensors")]
    assert any(key.startswith("mlflow/") for key in weights), listing
    assert any(key.startswith(f"datasets/{CUSTOMER}/") for key in listing.split()), listing
    step(f"S3 holds the version's weights: {[k for k in weights if k.startswith('mlflow/')]}")
    customers = subprocess.run(
        [sys.executable, "-m", "lora_ops", "customers", "show", CUSTOMER],
        capture_output=True, text=True, timeout=180, env={**os.environ, **stack.env},
    )  # fmt: skip
    assert customers.returncode == 0, customers.stdout + customers.stderr
    assert "production" in customers.stdout, customers.stdout
    step("lora-ops on the host (Postgres, MLflow and S3 through the published ports): "
         f"customers show {CUSTOMER} lists version 1 in production")  # fmt: skip

    # Greedy decoding of one adapter version: every replica must give the same answer.
    answers = {}
    for replica in ("SERVE_0", "SERVE_1"):
        answers[replica] = ask(stack.url(replica), CUSTOMER)
        step(f"{replica.lower().replace('_', '-')} answers as {CUSTOMER}: {answers[replica]!r}")
    assert answers["SERVE_0"] == answers["SERVE_1"]

    step("restart serve-1: it loads the production adapter by itself")
    stack.compose("restart", "serve-1", timeout_s=300)
    stack.wait_healthy("serve-1")
    again = ask(stack.url("SERVE_1"), CUSTOMER)
    assert again == answers["SERVE_0"]
    step(f"serve-1 after its restart answers as {CUSTOMER}, as before: {again!r}")

    fine_tune_through_the_api(stack)

    step("stop prefect-worker (SIGTERM)")
    started = time.monotonic()
    stack.compose("stop", "prefect-worker", timeout_s=300)
    stopped = stack.services()["prefect-worker"]
    assert (stopped["State"], stopped["ExitCode"]) == ("exited", 0), stopped
    step(f"prefect-worker exited 0 on SIGTERM in {time.monotonic() - started:.1f} s")

    stack.compose("down", "-v", "-t", "30", timeout_s=300)
    left = engine.project_leftovers(stack.name)
    assert left == {"containers": [], "volumes": [], "networks": []}, left
    step("down -v: no container, volume or network of the project is left")


def fine_tune_through_the_api(stack: Stack) -> None:
    """The customer's front door: a key, an upload and a job with OpenAI's client."""
    key = stack.exec("prefect-worker", "lora-ops", "keys", "create", "--customer", CUSTOMER)
    client = openai.OpenAI(base_url=stack.url("API") + "/v1", api_key=key.strip(), timeout=120)
    assert httpx.get(stack.url("API") + "/v1/files", timeout=30).status_code == 401
    data = "".join(SAMPLE.read_text().splitlines(keepends=True)[120:180]).encode()
    uploaded = client.files.create(file=("more.jsonl", data), purpose="fine-tune")
    assert [f.id for f in client.files.list().data] == [uploaded.id]
    step(f"api: key made in the worker container, {uploaded.filename} uploaded as {uploaded.id}")
    job = client.fine_tuning.jobs.create(
        training_file=uploaded.id, model="tiny-llama", hyperparameters={"max_steps": 8}
    )
    deadline = time.monotonic() + 900
    while job.status not in {"succeeded", "failed", "cancelled"}:
        assert time.monotonic() < deadline, job
        time.sleep(3)
        job = client.fine_tuning.jobs.retrieve(job.id)
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data]
    assert (job.status, job.fine_tuned_model) == ("succeeded", CUSTOMER), (job, events[:20])
    step(f"api: job {job.id} succeeded ({len(events)} events); fine_tuned_model {CUSTOMER}")
