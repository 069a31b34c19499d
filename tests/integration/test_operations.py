"""Daily operations on the real servers: customers as records, their schedules as Prefect
deployments, runs triggered through Prefect's REST API and run by a real worker, scheduled
runs that skip unchanged data, human review, and training on its own work pool."""

from __future__ import annotations

import datetime as dt
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from lora_ops import names
from lora_ops.cli import app
from lora_ops.cli.common import out
from lora_ops.db import Database
from lora_ops.fleet import Fleet
from lora_ops.registry import Registry, review
from lora_ops.registry.tags import (
    APPROVED_TAG,
    REVIEW_TAG,
    REVIEWED_BY_TAG,
    TRAINING_DONE,
    TRAINING_DONE_TAG,
)
from tests.integration.conftest import RunningStack, free_port
from tests.processes import ReplicaProcess, WorkerProcess

pytestmark = pytest.mark.integration
SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"
TOKEN = "operations-admin-token"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
TRAINING = [
    *("--base", "tiny-llama", "--rank", "8", "--lr", "1e-2", "--max-steps", "8"),
    *("--batch-size", "4", "--max-seq-len", "256", "--min-improvement", "0.001"),
    *("--production-tolerance", "0.99"),
]
runner = CliRunner()


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args), terminal_width=200)
    assert result.exit_code == 0, f"{args}: {result.output}{result.exception!r}"
    return result.output


def write_lines(path: Path, lines: slice) -> Path:
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[lines]))
    return path


class PrefectApi:
    """Prefect's REST API, called the way the README's curl lines call it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        for _ in range(20):  # the SQLite-backed server answers 503 while it is busy
            response = httpx.request(method, self.url + path, timeout=30, **kwargs)
            if response.status_code != 503:
                break
            time.sleep(0.5)
        response.raise_for_status()
        return response.json()

    def deployment(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/deployments/name/{name}")

    def run(self, deployment: str, parameters: dict[str, Any] | None = None) -> str:
        deployment_id = self.deployment(deployment)["id"]
        body = {"parameters": parameters or {}}
        return str(
            self.call("POST", f"/deployments/{deployment_id}/create_flow_run", json=body)["id"]
        )

    def wait(self, run_id: str, until: set[str] = FINAL, timeout_s: float = 420) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            run = self.call("GET", f"/flow_runs/{run_id}")
            if run["state"]["type"] in until:
                return run
            assert time.monotonic() < deadline, f"flow run {run_id} is still {run['state']}"
            time.sleep(1)

    def runs_of(self, deployment_id: str) -> list[dict[str, Any]]:
        body = {"deployments": {"id": {"any_": [deployment_id]}}, "sort": "START_TIME_DESC"}
        return self.call("POST", "/flow_runs/filter", json=body)


@pytest.fixture(autouse=True)
def _wide_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(out, "width", 200)  # as on a wide terminal: table cells stay whole


@pytest.fixture(scope="module")
def prefect(stack: RunningStack) -> PrefectApi:
    return PrefectApi(stack.prefect_url)


@pytest.fixture(scope="module")
def fleet(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One tiny-llama replica as the whole fleet."""
    fleet = Fleet(Database(), admin_token=TOKEN)
    replica = ReplicaProcess(free_port(), tmp_path_factory.mktemp("replica") / "r.log", TOKEN)
    replica.start()
    for url in fleet.urls():  # replicas other modules left registered
        fleet.remove(url)
    fleet.add(replica.url)
    try:
        yield fleet
    finally:
        replica.kill()
        fleet.remove(replica.url)


@pytest.fixture(scope="module")
def worker(
    stack: RunningStack, fleet: Fleet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A real `lora-ops worker` on a pool of its own; the settings it runs flows with."""
    pool = f"ops-{uuid.uuid4().hex[:6]}"
    env = {
        "LORA_OPS_WORK_POOL": pool,
        "LORA_OPS_ADMIN_TOKEN": TOKEN,
        "LORA_OPS_REVIEW_POLL_SECONDS": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():  # `schedule sync` here uses the same pool
            patch.setenv(name, value)
        process = WorkerProcess(pool, free_port(), tmp_path_factory.mktemp("worker") / "w.log", env)
        process.start()
        try:
            yield process
        finally:
            process.stop()


def versions(customer: str) -> list[str]:
    return sorted(str(v.version) for v in Registry().latest_versions(customer, 20))


def test_a_customer_from_record_to_scheduled_deploys(
    worker: WorkerProcess, prefect: PrefectApi, fleet: Fleet, tmp_path: Path
) -> None:
    data = write_lines(tmp_path / "sched.jsonl", slice(0, 40))
    cli("customers", "add", "sched-co", "--name", "Sched Co", "--data", str(data), *TRAINING,
        "--schedule", "0 3 * * *", "--timezone", "Europe/Paris")  # fmt: skip
    synced = cli("schedule", "sync")
    assert "applied retrain/sched-co" in synced

    deployment = prefect.deployment("retrain/sched-co")
    assert deployment["work_pool_name"] == worker.pool
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    assert deployment["schedules"][0]["schedule"]["timezone"] == "Europe/Paris"
    assert deployment["parameters"]["data_uri"] == str(data)
    assert deployment["parameters"]["config"]["max_steps"] == 8
    listing = cli("schedule", "list")
    assert "retrain/sched-co" in listing
    assert "0 3 * * * (Europe/Paris)" in listing

    config = {**deployment["parameters"]["config"], "max_steps": 6}
    run_id = prefect.run("retrain/sched-co", {"config": config})
    run = prefect.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"]["config"]["max_steps"] == 6
    children = {"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}
    (training,) = prefect.call("POST", "/flow_runs/filter", json=children)
    assert prefect.call("GET", f"/flows/{training['flow_id']}")["name"] == "train-adapter"
    assert training["state"]["type"] == "COMPLETED"
    body = {"logs": {"flow_run_id": {"any_": [training["id"]]}}}
    logged = [entry["message"] for entry in prefect.call("POST", "/logs/filter", json=body)]
    assert any(line.startswith("step 6/6  loss ") for line in logged), logged  # lora_ops's own
    assert versions("sched-co") == ["1"]
    registered = Registry().get_version("sched-co", "1")
    assert Registry().client.get_run(registered.run_id).data.params["max_steps"] == "6"

    # `pipeline run --remote` submits to the same deployment and follows the run to its end;
    # the data has not changed, so it ends at once, with no new version.
    remote = cli("pipeline", "run", "--customer", "sched-co", "--remote", "--max-steps", "6")
    assert "submitted to retrain/sched-co" in remote
    assert "No new data: no new data: version 1 of adapter-sched-co" in remote
    assert versions("sched-co") == ["1"]

    # From now on only the scheduler starts runs: every minute, as cron says. One
    # scheduled run is waited for (a minute's boundary each): "no new data" is shown above.
    with data.open("a") as more:
        more.write("".join(SAMPLE.read_text().splitlines(keepends=True)[40:50]))
    cli("customers", "update", "sched-co", "--schedule", "* * * * *", "--max-steps", "6",
        "--auto-deploy")  # fmt: skip
    cli("schedule", "sync")
    schedules = prefect.deployment("retrain/sched-co")["schedules"]
    assert [s["schedule"]["cron"] for s in schedules] == ["* * * * *"]  # replaced, not added
    appended = wait_for_scheduled_run(prefect, deployment["id"], after=utcnow())
    try:
        assert appended["state"]["name"] == "Deployed", appended["state"]
        assert versions("sched-co") == ["1", "2"]
        assert Registry().get_aliases("sched-co")[names.PRODUCTION] == "2"
        (url,) = fleet.urls()
        assert fleet.served_from(url)["sched-co"].endswith("adapter-sched-co/2")
    finally:
        cli("customers", "update", "sched-co", "--no-schedule")
        cli("schedule", "sync")
    assert prefect.deployment("retrain/sched-co")["schedules"] == []

    shown = cli("customers", "show", "sched-co")
    assert "candidate, production" in shown  # version 2
    assert "passed" in shown
    assert "succeeded" in shown  # the deployment history
    cli("customers", "update", "sched-co", "--inactive")
    assert "paused  retrain/sched-co" in cli("schedule", "sync")
    assert prefect.deployment("retrain/sched-co")["paused"] is True


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def wait_for_scheduled_run(
    prefect: PrefectApi, deployment_id: str, after: dt.datetime, timeout_s: float = 300
) -> dict[str, Any]:
    """The first run the scheduler made that started after ``after``, once it has ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in reversed(prefect.runs_of(deployment_id)):
            started = run["start_time"] and dt.datetime.fromisoformat(run["start_time"])
            if run["auto_scheduled"] and started and started > after:
                return prefect.wait(run["id"])
        time.sleep(2)
    raise AssertionError(f"no scheduled run of {deployment_id} started after {after}")


def test_review_holds_the_deploy_until_approval_and_a_rejection_ends_the_run(
    worker: WorkerProcess, prefect: PrefectApi, fleet: Fleet, tmp_path: Path
) -> None:
    data = write_lines(tmp_path / "review.jsonl", slice(120, 160))
    cli("customers", "add", "review-co", "--data", str(data), *TRAINING,
        "--auto-deploy", "--require-review")  # fmt: skip
    cli("schedule", "sync")
    (url,) = fleet.urls()
    registry = Registry()

    paused = prefect.wait(prefect.run("retrain/review-co"), until={"PAUSED", *FINAL})
    assert paused["state"]["type"] == "PAUSED", paused["state"]
    assert registry.get_version("review-co", "1").tags[REVIEW_TAG] == review.PENDING
    assert registry.get_aliases("review-co")[names.PRODUCTION] is None
    assert "review-co" not in fleet.models(url)
    refused = runner.invoke(app, ["deploy", "--customer", "review-co", "--version", "1"])
    assert "needs a reviewer's approval" in str(refused.exception)

    # The reviewer's click in the MLflow UI: a tag on the version; the sweep resumes the run.
    registry.client.set_model_version_tag("adapter-review-co", "1", APPROVED_TAG, "true")
    prefect.wait(prefect.run(f"review-sweep/{worker.pool}"))
    approved = prefect.wait(paused["id"])
    assert approved["state"]["name"] == "Deployed", approved["state"]
    assert registry.get_aliases("review-co")[names.PRODUCTION] == "1"
    assert fleet.served_from(url)["review-co"].endswith("adapter-review-co/1")

    with data.open("a") as more:
        more.write("".join(SAMPLE.read_text().splitlines(keepends=True)[160:170]))
    second = prefect.wait(prefect.run("retrain/review-co"), until={"PAUSED", *FINAL})
    assert second["state"]["type"] == "PAUSED", second["state"]
    registry.client.set_model_version_tag("adapter-review-co", "2", APPROVED_TAG, "false")
    prefect.wait(prefect.run(f"review-sweep/{worker.pool}"))
    rejected = prefect.wait(second["id"])
    assert rejected["state"]["name"] == "Rejected", rejected["state"]
    assert "rejected in review: not deployed" in rejected["state"]["message"]
    assert registry.get_aliases("review-co")[names.PRODUCTION] == "1"
    assert fleet.served_from(url)["review-co"].endswith("adapter-review-co/1")

    # A reviewer who changes their mind approves from the command line; deploy then goes.
    approved_now = cli("approve", "--customer", "review-co", "--version", "2", "--reviewer", "dana")
    assert "adapter-review-co version 2 approved by dana" in approved_now
    tags = registry.get_version("review-co", "2").tags
    decided = (tags[APPROVED_TAG], tags[REVIEW_TAG], tags[REVIEWED_BY_TAG])
    assert decided == ("true", review.APPROVED, "dana")
    cli("deploy", "--customer", "review-co", "--version", "2")
    assert fleet.served_from(url)["review-co"].endswith("adapter-review-co/2")


@pytest.mark.long  # make test-slow: minutes of real workers
def test_training_runs_on_its_own_work_pool(
    worker: WorkerProcess,
    prefect: PrefectApi,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu_pool = f"gpu-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("LORA_OPS_TRAINING_WORK_POOL", gpu_pool)
    data = write_lines(tmp_path / "gpu.jsonl", slice(240, 280))
    cli("customers", "add", "gpu-co", "--data", str(data), *TRAINING)
    assert f"applied train-adapter/{gpu_pool}" in cli("schedule", "sync")
    env = {"PREFECT_WORKER_QUERY_SECONDS": "1"}
    trainer = WorkerProcess(gpu_pool, free_port(), tmp_path / "trainer.log", env)
    trainer.start()
    try:
        ran = cli("pipeline", "run", "--customer", "gpu-co")  # here, except for training
    finally:
        trainer.stop()
    assert "registered adapter-gpu-co version 1" in ran
    training = prefect.deployment(f"train-adapter/{gpu_pool}")
    (run,) = prefect.runs_of(training["id"])
    assert run["state"]["type"] == "COMPLETED"
    assert run["parameters"]["dataset"]["customer"] == "gpu-co"
    assert run["parent_task_run_id"] is not None  # a subflow of the retrain run
    version = Registry().get_version("gpu-co", "1")
    assert Registry().client.get_run(version.run_id).data.tags[TRAINING_DONE_TAG] == TRAINING_DONE


def flow_run_pids(run_id: str) -> list[int]:
    """Processes on this machine that execute flow run ``run_id``."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PREFECT__FLOW_RUN_ID={run_id}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.long  # make test-slow: minutes of real workers
def test_a_stopped_worker_hands_its_run_back_to_the_next_worker(
    stack: RunningStack,
    prefect: PrefectApi,
    fleet: Fleet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SIGTERM, as Docker, Kubernetes and systemd stop a process: to the worker alone.
    pool = f"stop-{uuid.uuid4().hex[:6]}"
    env = {"LORA_OPS_WORK_POOL": pool, "LORA_OPS_ADMIN_TOKEN": TOKEN}
    env |= {"PREFECT_WORKER_QUERY_SECONDS": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    data = write_lines(tmp_path / "stop.jsonl", slice(100, 140))
    long_training = [*TRAINING, "--max-steps", "100000", "--checkpoint-every", "100000"]
    cli("customers", "add", "stop-co", "--data", str(data), *long_training)
    cli("schedule", "sync")
    first = WorkerProcess(pool, free_port(), tmp_path / "first.log", env)
    first.start()
    second: WorkerProcess | None = None
    run_id = prefect.run("retrain/stop-co")
    try:
        children = {"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}
        deadline = time.monotonic() + 300
        while not prefect.call("POST", "/flow_runs/filter", json=children):  # training began
            assert time.monotonic() < deadline, prefect.call("GET", f"/flow_runs/{run_id}")
            time.sleep(1)
        assert flow_run_pids(run_id)
        assert first.process is not None
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(timeout=120) == 0, first.log.read_text()
        assert "handed back to the pool" in first.log.read_text()
        assert flow_run_pids(run_id) == []  # nothing of the run is left running
        run = prefect.call("GET", f"/flow_runs/{run_id}")
        assert (run["state"]["type"], run["state"]["name"]) == ("SCHEDULED", "Handed back")

        second = WorkerProcess(pool, free_port(), tmp_path / "second.log", env)
        second.start()
        prefect.wait(run_id, until={"RUNNING"})
        deadline = time.monotonic() + 120
        while not flow_run_pids(run_id):
            assert time.monotonic() < deadline, second.log.read_text()
            time.sleep(0.5)
    finally:
        cancelling = {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True}
        prefect.call("POST", f"/flow_runs/{run_id}/set_state", json=cancelling)
        prefect.wait(run_id, until={"CANCELLED", "CRASHED", "FAILED", "COMPLETED"})
        for process in (first, second):
            if process is not None:
                process.stop()
        cli("customers", "update", "stop-co", "--inactive")
        cli("schedule", "sync")
