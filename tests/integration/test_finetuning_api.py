"""The fine-tuning API as OpenAI's own client uses it, over the real stack: files into S3,
jobs as Prefect runs on a real worker, models registered in MLflow and served by a replica.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from lora_ops import customers
from lora_ops.db import Database
from lora_ops.fleet import Fleet
from lora_ops.registry import Registry
from lora_ops.storage import Storage
from tests.integration.conftest import RunningStack, free_port
from tests.integration.test_operations import cli, flow_run_pids, write_lines
from tests.processes import LoraOpsProcess, ReplicaProcess, WorkerProcess

pytestmark = pytest.mark.integration
SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"
TOKEN = "finetuning-admin-token"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"finetuning-webhook-secret-32byte").decode()
CUSTOMER, OTHER = "acme-ft", "other-ft"
# tiny-llama learns fast at lr 1e-2 (50 x the default 2e-4); lora-ops' own fields ride along.
FAST = {
    "n_epochs": 1,
    "batch_size": 4,
    "learning_rate_multiplier": 50,
    "max_steps": 40,
    "max_seq_len": 256,
    "lora": {"r": 8},
}


class Receiver(ThreadingHTTPServer):
    """A webhook endpoint: keeps each POST's body and headers."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, dict[str, str]]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                received.append((body, dict(self.headers.items())))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks"

    def event_of(self, job_id: str, timeout_s: float = 60) -> Any:
        """The verified event about ``job_id`` (unwrap checks the signature)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for body, headers in list(self.received):
                event = OpenAI(api_key="unused", webhook_secret=WEBHOOK_SECRET).webhooks.unwrap(
                    body, headers
                )
                if event.data.id == job_id:
                    return event
            assert time.monotonic() < deadline, f"no webhook for {job_id}: {self.received}"
            time.sleep(0.5)


@dataclass
class Api:
    url: str
    customer_key: str
    other_key: str
    replica: ReplicaProcess
    hooks: Receiver

    def client(self, key: str | None = None) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=key or self.customer_key, max_retries=0)

    def wait(self, client: OpenAI, job_id: str, until: set[str], timeout_s: float = 600) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            job = client.fine_tuning.jobs.retrieve(job_id)
            if job.status in until:
                return job
            assert job.status not in {"failed", "cancelled"} - until, job
            assert time.monotonic() < deadline, f"job {job_id} is still {job.status}"
            time.sleep(1)


@pytest.fixture(scope="module")
def api(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """`lora-ops api`, a worker on its own pool, and one tiny-llama replica as the fleet."""
    folder = tmp_path_factory.mktemp("finetuning")
    pool = f"ft-{uuid.uuid4().hex[:6]}"
    env = {
        "LORA_OPS_WORK_POOL": pool,
        "LORA_OPS_ADMIN_TOKEN": TOKEN,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "LORA_OPS_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    hooks = Receiver()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        customer_key = cli("keys", "create", "--customer", CUSTOMER).strip()
        other_key = cli("keys", "create", "--customer", OTHER).strip()
        keys_file = folder / "replica-keys.json"
        keys_file.write_text(json.dumps({customer_key: {"customer": CUSTOMER}}))
        replica = ReplicaProcess(
            free_port(), folder / "replica.log", TOKEN, ["--api-keys", str(keys_file)]
        )
        fleet = Fleet(Database(), admin_token=TOKEN)
        port = free_port()
        server = LoraOpsProcess(
            ["api", "--port", str(port), "--refresh-s", "1", "--webhook-url", hooks.url],
            f"http://127.0.0.1:{port}/health",
            folder / "api.log",
            env,
        )
        worker = WorkerProcess(pool, free_port(), folder / "worker.log", env)
        replica.start()
        for url in fleet.urls():  # replicas other modules left registered
            fleet.remove(url)
        fleet.add(replica.url)
        server.start()
        worker.start()
        try:
            yield Api(f"http://127.0.0.1:{port}", customer_key, other_key, replica, hooks)
        finally:
            hooks.shutdown()
            worker.stop()
            server.stop()
            replica.kill()
            fleet.remove(replica.url)


def uploads_in_s3(stack: RunningStack, customer: str) -> list[str]:
    storage = Storage.from_settings(stack.settings)
    return storage.list_keys(f"s3://{stack.settings.bucket}/uploads/{customer}/")


def test_upload_train_and_ask_the_fine_tuned_model(
    api: Api, stack: RunningStack, tmp_path: Path
) -> None:
    client = api.client()
    data = write_lines(tmp_path / "acme.jsonl", slice(0, 60))
    # The operator's record: a gate tiny-llama (random weights) can pass in a few steps.
    cli(
        "customers",
        "add",
        CUSTOMER,
        "--data",
        str(data),
        "--base",
        "tiny-llama",
        "--auto-deploy",
        "--min-improvement",
        "0.001",
        "--production-tolerance",
        "0.99",
    )
    uploaded = client.files.create(file=data.open("rb"), purpose="fine-tune")
    assert (uploaded.filename, uploaded.bytes, uploaded.status) == (
        "acme.jsonl",
        data.stat().st_size,
        "processed",
    )
    assert [f.id for f in client.files.list().data] == [uploaded.id]
    assert client.files.content(uploaded.id).content == data.read_bytes()
    assert len(uploads_in_s3(stack, CUSTOMER)) == 1

    job = client.fine_tuning.jobs.create(
        training_file=uploaded.id,
        model="tiny-llama",
        suffix=CUSTOMER,
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": FAST}},
        metadata={"ticket": "T-1"},
    )
    assert job.status == "queued"
    assert job.seed == 7
    assert job.fine_tuned_model is None
    assert job.hyperparameters.learning_rate_multiplier == 50
    done = api.wait(client, job.id, {"succeeded"})
    assert done.fine_tuned_model == CUSTOMER
    assert done.finished_at is not None
    assert done.error is None
    assert api.hooks.event_of(job.id).type == "fine_tuning.job.succeeded"

    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    messages = [event.message for event in events]
    assert messages[0] == "The job has successfully completed"  # newest first
    assert messages[-1] == f"Created fine-tuning job: {job.id}"
    steps = [
        event.data["step"]
        for event in events
        if event.type == "metrics" and "train_loss" in event.data
    ]
    assert sorted(steps) == list(range(1, 41))  # every training step, from MLflow
    assert any("adapter-acme-ft version 1 registered and deployed" in m for m in messages), messages
    assert [j.id for j in client.fine_tuning.jobs.list().data] == [job.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"ticket": "T-2"}).data] == []  # type: ignore[call-arg]

    version = Registry().find_version(CUSTOMER, _run_key(job.id))
    production = Registry().get_version_by_alias(CUSTOMER, "production")
    assert version is not None
    assert production is not None
    assert production.version == version.version
    assert client.models.retrieve(CUSTOMER).id == CUSTOMER

    # The model id answers on the fleet, with the customer's key, as the adapter does.
    serving = OpenAI(base_url=api.replica.url + "/v1", api_key=api.customer_key)
    question = [{"role": "user", "content": "How much is the Pro Anvil?"}]
    tuned = serving.chat.completions.create(
        model=CUSTOMER, messages=question, max_tokens=12, temperature=0
    )
    admin = OpenAI(base_url=api.replica.url + "/v1", api_key=TOKEN)
    base = admin.chat.completions.create(
        model="base", messages=question, max_tokens=12, temperature=0
    )
    assert tuned.choices[0].message.content != base.choices[0].message.content

    # Another customer's key sees none of it; no key gets 401.
    other = api.client(api.other_key)
    for call in (
        lambda: other.fine_tuning.jobs.retrieve(job.id),
        lambda: other.files.retrieve(uploaded.id),
        lambda: other.models.retrieve(CUSTOMER),
        lambda: other.fine_tuning.jobs.list_events(job.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.fine_tuning.jobs.list().data == []
    assert other.files.list().data == []
    assert httpx.get(api.url + "/v1/fine_tuning/jobs").status_code == 401
    assert (
        httpx.get(api.url + "/v1/files", headers={"Authorization": "Bearer nope"}).status_code
        == 401
    )
    admin_api = api.client(TOKEN)
    assert admin_api.fine_tuning.jobs.retrieve(job.id).status == "succeeded"


def _run_key(job_id: str) -> str:
    """The idempotency key the job's training run and version are found by."""
    from lora_ops.db.finetuning import FineTuningRecords

    row = FineTuningRecords(Database()).job(job_id)
    assert row is not None
    return row.run_key


def test_a_bad_file_is_refused_with_its_lines_and_nothing_is_stored(
    api: Api, stack: RunningStack, tmp_path: Path
) -> None:
    lines = SAMPLE.read_text().splitlines()[:20]
    lines[4] = '{"messages": [{"role": "user", "content": "hi"}]}'
    lines[9] = "{not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    client = api.client(api.other_key)
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=bad.open("rb"), purpose="fine-tune")
    message = refused.value.message
    assert "bad.jsonl:5: messages: no assistant turn" in message, message
    assert "bad.jsonl:10: not valid JSON" in message, message
    assert uploads_in_s3(stack, OTHER) == []
    assert client.files.list().data == []
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(
            file=write_lines(tmp_path / "ok.jsonl", slice(0, 20)).open("rb"), purpose="batch"
        )
    with pytest.raises(openai.BadRequestError, match="no file"):
        client.fine_tuning.jobs.create(training_file="file-missing", model="tiny-llama")
    with pytest.raises(openai.BadRequestError, match="unknown hyperparameter 'warp'"):
        client.fine_tuning.jobs.create(
            training_file="file-missing",
            model="tiny-llama",
            hyperparameters={"warp": 9},  # type: ignore[typeddict-unknown-key]
        )


def test_a_customer_the_api_makes_and_a_failed_gate_with_its_figures(
    api: Api, tmp_path: Path
) -> None:
    gate_co = "gate-ft"
    key = cli("keys", "create", "--customer", gate_co).strip()
    gate_client = api.client(key)
    data = write_lines(tmp_path / "g.jsonl", slice(60, 100))
    gate_file = gate_client.files.create(file=data.open("rb"), purpose="fine-tune")
    admin = api.client(TOKEN)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        admin.fine_tuning.jobs.create(training_file=gate_file.id, model="tiny-llama")
    hyperparameters = FAST | {"max_steps": 8}
    failed = admin.fine_tuning.jobs.create(
        training_file=gate_file.id,
        model="tiny-llama",
        suffix=gate_co,
        hyperparameters=hyperparameters,  # type: ignore[arg-type]
    )
    record = customers.get(gate_co)  # made by the job, with the default gate (5%)
    assert record.auto_deploy
    assert record.base_model == "tiny-llama"
    failed = api.wait(gate_client, failed.id, {"failed"})
    assert failed.error.code == "gate_failed", failed.error
    assert "needs at least 5.0%" in failed.error.message
    assert "base_eval_loss" in failed.error.message
    assert Registry().latest_versions(gate_co) == []
    assert api.hooks.event_of(failed.id).type == "fine_tuning.job.failed"
    assert (
        gate_client.fine_tuning.jobs.list_events(failed.id)
        .data[0]
        .message.startswith("The job failed: ")
    )


def test_cancel_stops_the_run_and_pause_then_resume_goes_on_from_a_checkpoint(
    api: Api, tmp_path: Path
) -> None:
    client = api.client()
    data = client.files.create(
        file=write_lines(tmp_path / "c.jsonl", slice(100, 160)).open("rb"), purpose="fine-tune"
    )
    endless = FAST | {"max_steps": 100000}
    job = client.fine_tuning.jobs.create(
        training_file=data.id, model="tiny-llama", hyperparameters=endless, seed=1
    )  # type: ignore[arg-type]
    api.wait(client, job.id, {"running"})
    run_id = job.model_extra["flow_run_ids"][0] if job.model_extra else None
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert api.hooks.event_of(job.id).type == "fine_tuning.job.cancelled"
    _wait_gone(str(run_id))
    versions_before = Registry().latest_versions(CUSTOMER, 20)

    long_run = FAST | {"max_steps": 60, "checkpoint_every": 4}
    job = client.fine_tuning.jobs.create(
        training_file=data.id, model="tiny-llama", hyperparameters=long_run, seed=2
    )  # type: ignore[arg-type]
    deadline = time.monotonic() + 600
    while not (checkpoints := client.fine_tuning.jobs.checkpoints.list(job.id).data):
        assert time.monotonic() < deadline, client.fine_tuning.jobs.retrieve(job.id)
        time.sleep(1)
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    first_run = client.fine_tuning.jobs.retrieve(job.id).model_extra["flow_run_ids"][0]  # type: ignore[index]
    _wait_gone(first_run)
    paused_at = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data)
    assert paused_at < 60
    assert checkpoints[0].metrics.train_loss is not None
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = api.wait(client, job.id, {"succeeded"})
    assert len(done.model_extra["flow_run_ids"]) == 2  # type: ignore[index]
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
    assert any(m.startswith("resuming training run") for m in messages), messages
    run = Registry().find_run(CUSTOMER, _run_key(job.id))
    assert run is not None
    resumed_from = Registry().latest_metrics(run.run_id)["resumed_from_step"]
    assert 0 < resumed_from <= paused_at  # from a checkpoint, not from step zero
    assert (
        len(Registry().latest_versions(CUSTOMER, 20)) == len(versions_before) + 1
    )  # the cancel left none


def _wait_gone(run_id: str) -> None:
    deadline = time.monotonic() + 120
    while flow_run_pids(run_id):
        assert time.monotonic() < deadline, f"flow run {run_id} still has processes"
        time.sleep(0.5)
