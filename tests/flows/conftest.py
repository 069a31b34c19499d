"""The retrain flow under Prefect's test harness (a throwaway Prefect server, SQLite).

The library steps that need S3, MLflow or a training run are replaced by an in-memory
pipeline that keeps registered versions in a dict; what is under test is the flow: which
tasks run, in which order, which errors are retried, and how each run ends. The data
check and the evaluation gate are the real ones. The real servers drive the same flow in
tests/integration/test_pipeline.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows import tasks
from lora_ops import pipeline
from lora_ops.config import TrainConfig
from lora_ops.registry import review
from lora_ops.training.gate import decide_gate


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[None]:
    # Module scope, not session: the harness overrides PREFECT_API_URL while it is open,
    # and later integration tests must reach the embedded stack's Prefect server instead.
    with prefect_test_harness(server_startup_timeout=120):
        yield


@dataclass
class InMemoryPipeline:
    """The retrain steps' outside effects kept in memory, with the calls they received."""

    base_loss: float = 2.0
    candidate_loss: float = 1.0
    failures: dict[str, list[BaseException]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # idempotency key -> version
    calls: list[str] = field(default_factory=list)
    review_requests: list[tuple[str, str]] = field(default_factory=list)

    def _enter(self, step: str) -> None:
        self.calls.append(step)
        pending = self.failures.get(step)
        if pending:
            raise pending.pop(0)

    def existing_version(self, customer: str, key: str) -> str | None:
        self._enter("find-registered-version")
        return self.versions.get(key)

    def prepare(
        self,
        customer: str,
        data_uri: str,
        base: str,
        max_seq_len: int,
        eval_fraction: float,
        validation_data_uri: str | None = None,
    ) -> pipeline.DatasetRef:
        self._enter("prep")
        sha256, _ = pipeline.data_fingerprint(
            customer, data_uri, base, TrainConfig(), validation_data_uri=validation_data_uri
        )
        uri = f"s3://bucket/datasets/{customer}/{sha256}/"
        return pipeline.DatasetRef(
            customer, sha256, uri, uri + "prompts.json", base, 8, 2, validation_data_uri
        )

    def train(self, dataset: pipeline.DatasetRef, config: TrainConfig) -> pipeline.TrainedRef:
        self._enter("train")
        key, base_sha = pipeline.run_key(dataset, config)
        steps = config.max_steps or 0
        return pipeline.TrainedRef(f"run-{len(self.calls)}", key, base_sha, steps, False)

    def evaluate(
        self,
        dataset: pipeline.DatasetRef,
        trained: pipeline.TrainedRef,
        min_improvement: float,
        production_tolerance: float,
    ) -> pipeline.EvalOutcome:
        self._enter("evaluate")
        gate = decide_gate(
            self.base_loss, self.candidate_loss, None, min_improvement, production_tolerance
        )
        return pipeline.EvalOutcome(gate, [], f"| gate | {gate.reason} |")

    def register(
        self,
        dataset: pipeline.DatasetRef,
        trained: pipeline.TrainedRef,
        outcome: pipeline.EvalOutcome,
        config: TrainConfig,
    ) -> str:
        self._enter("register")
        if not outcome.gate.passed:
            raise pipeline.GateFailed(f"gate failed for {dataset.customer}: {outcome.gate.reason}")
        version = str(len(set(self.versions.values())) + 1)
        self.versions[trained.key] = version
        return version

    def request_review(self, customer: str, version: str) -> None:
        self.review_requests.append((customer, version))


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch, prefect_harness: None) -> InMemoryPipeline:
    memory = InMemoryPipeline()
    monkeypatch.setattr(pipeline, "existing_version", memory.existing_version)
    monkeypatch.setattr(pipeline, "prepare_data", memory.prepare)
    monkeypatch.setattr(pipeline, "train_candidate", memory.train)
    monkeypatch.setattr(pipeline, "evaluate_candidate", memory.evaluate)
    monkeypatch.setattr(pipeline, "register_candidate", memory.register)
    monkeypatch.setattr(review, "request_review", memory.request_review)
    # The retry policy is under test, not its waits.
    for task in (
        tasks.check_data,
        tasks.find_registered_version,
        tasks.prep,
        tasks.evaluate,
        tasks.register,
    ):
        monkeypatch.setattr(task, "retry_delay_seconds", [0] * task.retries)
    monkeypatch.setattr(tasks.train, "retry_delay_seconds", 0)
    monkeypatch.delenv("LORA_OPS_TRAINING_WORK_POOL", raising=False)
    return memory


def run_retrain(data_uri: str, **options: Any) -> Any:
    """The retrain flow's final state (a failed run returns its state, it does not raise)."""
    from flows.retrain import retrain

    return retrain(
        customer="acme", data_uri=data_uri, base="tiny-llama", return_state=True, **options
    )
