"""Faults, survived: a killed training process, S3, MLflow or Prefect stopped during each
task of the retrain flow, a replica killed during a deploy, two deploys of one customer at
once. After each, the consistency checker compares registry, aliases and bucket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lora_ops import names
from lora_ops import stack as embedded
from lora_ops.registry import Registry
from lora_ops.storage import Storage
from tests.processes import ReplicaProcess
from tests.reliability.consistency import check_consistency
from tests.servers import free_port

pytestmark = pytest.mark.integration
LONG = pytest.mark.long
SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"
FLOW_SCRIPT = """
import sys
from flows.retrain import retrain
from lora_ops.config import TrainConfig
from lora_ops.lora import LoraSpec
config = TrainConfig(lora=LoraSpec(r=8, alpha=16), learning_rate=1e-2, max_steps=int(sys.argv[3]),
                     batch_size=4, max_seq_len=256, eval_fraction=0.2, checkpoint_every=4)
retrain(customer=sys.argv[1], data_uri=sys.argv[2], base="tiny-llama", config=config,
        min_improvement=0.001)
"""


def start_flow(customer: str, data: Path, steps: int, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", FLOW_SCRIPT, customer, str(data), str(steps)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for_checkpoint(stack: Any, customer: str, flow: subprocess.Popen[bytes]) -> str:
    """The S3 key of the first complete checkpoint the flow uploads."""
    storage = Storage.from_settings(stack.settings)
    prefix = names.s3_uri(stack.settings.bucket, f"checkpoints/{customer}/")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        done = [k for k in storage.list_keys(prefix) if k.endswith("/MANIFEST.json")]
        if done:
            return done[0]
        assert flow.poll() is None, "the flow ended before its first checkpoint"
        time.sleep(0.1)
    raise AssertionError("no checkpoint appeared")


def run_flow(customer: str, data: Path, steps: int) -> dict[str, Any]:
    from flows.retrain import retrain
    from lora_ops.config import TrainConfig
    from lora_ops.lora import LoraSpec

    config = TrainConfig(
        lora=LoraSpec(r=8, alpha=16),
        learning_rate=1e-2,
        max_steps=steps,
        batch_size=4,
        max_seq_len=256,
        eval_fraction=0.2,
        checkpoint_every=4,
    )
    return retrain(
        customer=customer,
        data_uri=str(data),
        base="tiny-llama",
        config=config,
        min_improvement=0.001,
    )


def registry_is_consistent(stack: Any, customer: str, work: Path) -> None:
    assert check_consistency(stack.settings, customer, work) == []


def test_killed_training_resumes_from_its_checkpoint(stack: Any, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[120:160]))
    flow = start_flow("umbrella", data, 40, tmp_path / "flow.log")
    key = wait_for_checkpoint(stack, "umbrella", flow)
    os.killpg(flow.pid, signal.SIGKILL)
    flow.wait(timeout=30)
    run_id = key.split("/")[2]

    result = run_flow("umbrella", data, 40)
    assert result["run_id"] == run_id  # the same MLflow run, continued
    registry = Registry(stack.settings.mlflow_tracking_uri)
    metrics = registry.client.get_run(run_id).data.metrics
    assert metrics["resumed_from_step"] >= 4
    steps = [m.step for m in registry.client.get_metric_history(run_id, "train_loss")]
    assert sorted(set(steps)) == list(range(1, 41))
    # steps before the checkpoint were not trained again
    assert steps.count(1) == 1
    registry_is_consistent(stack, "umbrella", tmp_path / "check")


@pytest.mark.long  # make test-slow; the default run stops S3 during evaluate
def test_s3_stopped_mid_run_fails_clearly_then_rerun_completes(stack: Any, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[160:200]))
    flow = start_flow("soylent", data, 40, tmp_path / "flow.log")
    wait_for_checkpoint(stack, "soylent", flow)
    s3 = next(row for row in embedded.status(stack.settings) if row.name == "s3")
    assert s3.pid is not None
    os.kill(s3.pid, signal.SIGKILL)
    try:
        assert flow.wait(timeout=240) != 0
        log = (tmp_path / "flow.log").read_text(errors="replace")
        assert f"S3 at {stack.settings.s3_endpoint_url} is unreachable" in log
        assert Registry(stack.settings.mlflow_tracking_uri).latest_versions("soylent") == []
    finally:
        embedded.up(stack.settings)  # brings back only the part that died
    result = run_flow("soylent", data, 40)
    assert result["version"] == "1"
    registry_is_consistent(stack, "soylent", tmp_path / "check")


# -- a service stopped during each task ------------------------------------------------------

STEPS = {"prep": "prepare_data", "train": "train_candidate", "evaluate": "evaluate_candidate"}
STEPS["register"] = "register_candidate"
# One fault per service in the default run; the whole matrix with `make test-slow`.
QUICK = {("s3", "evaluate"), ("mlflow", "register"), ("prefect", "train")}
MATRIX = [
    pytest.param(
        service, task, id=f"{service}-during-{task}", marks=() if (service, task) in QUICK else LONG
    )
    for service in ("s3", "mlflow", "prefect")
    for task in STEPS
]


def stop_service(stack: Any, name: str) -> None:
    """Kill a part of the stack with its children, as a crash would (no clean shutdown)."""
    part = next(row for row in embedded.status(stack.settings) if row.name == name)
    assert part.pid is not None
    os.killpg(part.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(row.healthy for row in embedded.status(stack.settings) if row.name == name):
        assert time.monotonic() < deadline, f"{name} still answers after SIGKILL"
        time.sleep(0.1)


@contextmanager
def quick_failures(monkeypatch: pytest.MonkeyPatch, service: str) -> Iterator[None]:
    """The clients of the stopped service give up in seconds, not after minutes of retries.

    Only those: Prefect's SQLite-backed server answers 503 now and then on a busy machine,
    and its client's retries are what carries a run through those when Prefect is not the
    service under test.
    """
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    prefect_retries = {PREFECT_CLIENT_MAX_RETRIES: 0} if service == "prefect" else {}
    with monkeypatch.context() as patch, temporary_settings(prefect_retries):
        if service in {"mlflow", "s3"}:  # MLflow serves its artifacts from S3
            patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            patch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        yield


@pytest.mark.parametrize(("service", "task"), MATRIX)
def test_a_service_stopped_during_a_task(
    service: str,
    task: str,
    stack: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lora_ops import pipeline

    customer = f"fault-{service}-{task}"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[200:240]))
    real_step = getattr(pipeline, STEPS[task])

    def step_with_fault(*args: Any, **kwargs: Any) -> Any:
        stop_service(stack, service)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pipeline, STEPS[task], step_with_fault)
    try:
        with quick_failures(monkeypatch, service), pytest.raises(Exception) as failed:  # noqa: PT011
            run_flow(customer, data, 8)  # each service fails its own way
    finally:
        monkeypatch.setattr(pipeline, STEPS[task], real_step)
        embedded.up(stack.settings)  # brings back only the part that died
    log_failure(service, task, failed.value)
    registered = Registry(stack.settings.mlflow_tracking_uri).latest_versions(customer)
    # Only Prefect's going away can leave work done: the task finished, its report did not.
    assert registered == [] or (service, task) == ("prefect", "register")
    registry_is_consistent(stack, customer, tmp_path / "after-fault")  # nothing half-done
    result = run_flow(customer, data, 8)
    assert result["version"] == "1"  # registered once, whichever run did it
    registry_is_consistent(stack, customer, tmp_path / "check")


def log_failure(service: str, task: str, error: BaseException) -> None:
    """What the user saw: it names the service that was down (or is Prefect's own)."""
    text = f"{type(error).__name__}: {error}"
    print(f"{service} stopped during {task}: {text[:300]}")
    named = {"s3": "S3", "mlflow": "MLflow at http://127.0.0.1"}
    assert named.get(service, "") in text


# -- deploys -----------------------------------------------------------------------------------

TOKEN = "fault-admin-token"


@pytest.fixture(scope="module")
def two_versions(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A customer with two registered versions; returns its id."""
    customer = "fault-deploy"
    root = tmp_path_factory.mktemp("deploy-data")
    for number, lines in ((1, slice(240, 280)), (2, slice(280, 320))):
        data = root / f"v{number}.jsonl"
        data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[lines]))
        assert run_flow(customer, data, 4)["version"] == str(number)
    return customer


@pytest.fixture
def fleet(stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Two tiny-llama replicas as the whole fleet."""
    from lora_ops.db import Database
    from lora_ops.fleet import Fleet

    monkeypatch.setenv("LORA_OPS_ADMIN_TOKEN", TOKEN)
    fleet = Fleet(Database(), admin_token=TOKEN)
    for url in fleet.urls():
        fleet.remove(url)
    replicas = [
        ReplicaProcess(free_port(), tmp_path / f"r{i}.log", TOKEN, ["--no-bootstrap"])
        for i in range(2)
    ]
    try:
        for replica in replicas:
            replica.start()
            fleet.add(replica.url)
        yield fleet, replicas
    finally:
        for replica in replicas:
            replica.kill()
            fleet.remove(replica.url)


def test_a_replica_killed_during_a_deploy_rolls_every_replica_back(
    two_versions: str, fleet: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from lora_ops.fleet import Fleet
    from lora_ops.fleet.rollout import DeployFailed, deploy

    client, replicas = fleet
    customer = two_versions
    deploy(customer, "1", fleet=client)
    real_load = Fleet.load

    def load_then_lose_the_second(self: Fleet, url: str, *args: Any, **kwargs: Any) -> None:
        if url == replicas[1].url:
            replicas[1].kill()  # dies while the deploy is under way, after replica 0 loaded v2
        real_load(self, url, *args, **kwargs)

    monkeypatch.setattr(Fleet, "load", load_then_lose_the_second)
    with pytest.raises(DeployFailed, match=f"replica {replicas[1].url}: unreachable"):
        deploy(customer, "2", fleet=client)
    monkeypatch.setattr(Fleet, "load", real_load)
    assert client.served_from(replicas[0].url)[customer].endswith(f"adapter-{customer}/1")
    registry = Registry()
    assert registry.get_aliases(customer)["production"] == "1"
    rows = {row.replica_url: row.status for row in client.db.deployments(customer, limit=2)}
    assert set(rows.values()) == {"failed"}
    registry_is_consistent_for(customer, tmp_path)


def registry_is_consistent_for(customer: str, work: Path) -> None:
    from lora_ops.settings import get_settings

    assert check_consistency(get_settings(), customer, work) == []


def test_two_deploys_of_one_customer_at_once_never_interleave(
    two_versions: str, fleet: Any, tmp_path: Path
) -> None:
    from lora_ops.db import DeployInProgress
    from lora_ops.fleet.rollout import deploy

    client, replicas = fleet
    customer = two_versions
    start = threading.Barrier(2)
    outcomes: dict[str, Any] = {}

    def deploy_version(version: str) -> None:
        start.wait()
        try:
            outcomes[version] = deploy(customer, version, fleet=client, triggered_by=f"v{version}")
        except DeployInProgress as exc:
            outcomes[version] = exc

    threads = [threading.Thread(target=deploy_version, args=(v,)) for v in ("1", "2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    refused = [v for v, outcome in outcomes.items() if isinstance(outcome, DeployInProgress)]
    assert len(refused) == 1, outcomes  # exactly one went ahead
    (winner,) = {"1", "2"} - set(refused)
    served = {client.served_from(r.url)[customer].rsplit("/", 1)[1] for r in replicas}
    assert served == {winner}  # every replica serves the one that went ahead
    assert Registry().get_aliases(customer)["production"] == winner
    history = client.db.deployments(customer, limit=10)
    assert [row.triggered_by for row in history[:2]] == [f"v{winner}"] * 2  # no loser's rows
    registry_is_consistent_for(customer, tmp_path)
