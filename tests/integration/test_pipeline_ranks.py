"""The pipeline's train step in two data-parallel processes (torchrun, gloo on the CPU) on
tiny-llama, against the real S3, MLflow and Prefect servers: rank 0 alone reports, the
adapter is the one a single process trains at the same global batch, and a run whose
processes were killed resumes from its checkpoint in S3."""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lora_ops import names, pipeline
from lora_ops.config import TrainConfig
from lora_ops.lora import LoraSpec
from lora_ops.pipeline import DatasetRef
from lora_ops.registry import Registry
from lora_ops.registry.tags import TRAINING_DONE, TRAINING_DONE_TAG
from lora_ops.storage import Storage
from tests.unit.training.group_rank import group_processes, wait_until_gone

pytestmark = pytest.mark.integration
SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"
# No dropout: each rank would draw its own masks, and no single process draws those.
CONFIG = TrainConfig(
    lora=LoraSpec(r=8, alpha=16, dropout=0.0),
    learning_rate=1e-2,
    max_steps=8,
    batch_size=4,
    max_seq_len=256,
    eval_fraction=0.2,
    checkpoint_every=4,
)
STEP_FIGURES = ("train_loss", "learning_rate", "grad_norm", "tokens_per_second")
# Two ranks sum their shares where one process sums the whole batch: the same terms in
# another order, so the weights agree up to float rounding, relative to each tensor's size.
RELATIVE = 1e-5


@pytest.fixture(scope="module")
def dataset(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> DatasetRef:
    data = tmp_path_factory.mktemp("ranks") / "data.jsonl"
    data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:40]))
    return pipeline.prepare_data(
        "ranks", str(data), "tiny-llama", CONFIG.max_seq_len, CONFIG.eval_fraction
    )


def adapter_weights(registry: Registry, run_id: str, work: Path) -> dict[str, torch.Tensor]:
    folder = registry.download_run_artifacts(run_id, "adapter", work / run_id)
    return load_file(folder / "adapter_model.safetensors")


def largest_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest ``|a - b| / |b|`` over the tensors (Frobenius norms)."""
    assert a.keys() == b.keys()
    return max(float(torch.linalg.norm(a[k] - b[k]) / torch.linalg.norm(b[k])) for k in a)


class Lines(logging.Handler):
    """The messages of one logger, whatever the logging setup (Prefect's) does to the root."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.INFO)
        self.logger, self.messages = logging.getLogger(name), list[str]()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> list[str]:
        self.logger.addHandler(self)
        self.level_before = self.logger.level
        self.logger.setLevel(logging.INFO)
        return self.messages

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)


def logged_steps(registry: Registry, run_id: str, figure: str) -> list[int]:
    return sorted(m.step for m in registry.client.get_metric_history(run_id, figure))


def test_two_processes_log_each_step_once_and_train_the_one_process_adapter(
    stack: Any,
    dataset: DatasetRef,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.training import train_adapter  # after the stack fixture set PREFECT_API_URL

    monkeypatch.setenv("LORA_OPS_TRAINING_PROCESSES", "2")
    with Lines("lora_ops.training.group") as lines:
        two = train_adapter(replace(dataset, customer="ranks-two"), CONFIG)
    monkeypatch.setenv("LORA_OPS_TRAINING_PROCESSES", "1")
    one = pipeline.train_candidate(replace(dataset, customer="ranks-one"), CONFIG, progress=False)
    assert (two.steps, one.steps) == (8, 8)

    registry = Registry(stack.settings.mlflow_tracking_uri)
    for figure in STEP_FIGURES:  # rank 0 logged each step; rank 1 nothing
        assert logged_steps(registry, two.run_id, figure) == list(range(1, 9)), figure
    run = registry.client.get_run(two.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[TRAINING_DONE_TAG] == TRAINING_DONE
    assert run.data.metrics["resumed_from_step"] == 0
    assert [a.path for a in registry.client.list_artifacts(two.run_id, "plots")] == [
        "plots/loss_curve.png"
    ]
    assert registry.metric_history(two.run_id, "train_loss") == pytest.approx(
        registry.metric_history(one.run_id, "train_loss"), rel=RELATIVE
    )
    storage = Storage.from_settings(stack.settings)
    prefix = names.checkpoint_prefix("ranks-two", two.run_id)
    keys = storage.list_keys(names.s3_uri(stack.settings.bucket, prefix))
    assert f"{prefix}step-4/MANIFEST.json" in keys

    two_weights = adapter_weights(registry, two.run_id, tmp_path)
    one_weights = adapter_weights(registry, one.run_id, tmp_path)
    difference = largest_relative_difference(two_weights, one_weights)
    print(f"largest relative weight difference, two processes vs one: {difference:.2e}")
    assert difference <= RELATIVE

    # The ranks' progress reached this process's log (a flow run's log), once: rank 0's.
    assert sum(line.startswith("step 8/8  loss") for line in lines) == 1, lines


# -- a cut-off run ---------------------------------------------------------------------------

LONG_CONFIG = CONFIG.model_copy(update={"max_steps": 40})
TRAIN_SCRIPT = """
import json, logging, sys
from lora_ops.config import TrainConfig
from lora_ops.pipeline import DatasetRef, train_candidate
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
config = TrainConfig.model_validate_json(sys.argv[2])
train_candidate(DatasetRef(**json.loads(sys.argv[1])), config, progress=False)
"""


def wait_for_line(flow: subprocess.Popen[str], prefix: str, seconds: float) -> list[str]:
    """Lines of the flow's output up to the first that starts with ``prefix``."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert flow.stdout is not None
        for line in flow.stdout:
            lines.put(line.rstrip())
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        assert line is not None, "the training ended early:\n" + "\n".join(seen[-40:])
        seen.append(line)
        if line.startswith(prefix):
            return seen
    raise AssertionError(f"no line {prefix!r} in time:\n" + "\n".join(seen[-40:]))


@pytest.mark.long  # make test-slow: three runs of 40 steps, one of them cut off
def test_killed_training_processes_stop_and_the_run_resumes_from_its_checkpoint(
    stack: Any, dataset: DatasetRef, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cut = replace(dataset, customer="ranks-cut")
    env = {**os.environ, "LORA_OPS_TRAINING_PROCESSES": "2"}
    arguments = [json.dumps(asdict(cut)), LONG_CONFIG.model_dump_json()]
    flow = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, *arguments],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        # Rank 0 logs every second step; step 4's checkpoint is in S3 before step 5 starts.
        wait_for_line(flow, "step 6/40  loss", seconds=300)
        assert len(group_processes(flow.pid)) == 3  # torchrun and its two ranks
    finally:
        os.killpg(flow.pid, signal.SIGKILL)  # the flow and torchrun; the ranks have sessions
        flow.wait(timeout=30)
    wait_until_gone(flow.pid, seconds=15)

    registry = Registry(stack.settings.mlflow_tracking_uri)
    key, _ = pipeline.run_key(cut, LONG_CONFIG)
    cut_run = registry.find_run("ranks-cut", key)
    assert cut_run is not None
    assert cut_run.tags.get(TRAINING_DONE_TAG) != TRAINING_DONE
    monkeypatch.setenv("LORA_OPS_TRAINING_PROCESSES", "2")
    resumed = pipeline.train_candidate(cut, LONG_CONFIG, progress=False)
    assert resumed.run_id == cut_run.run_id  # the same MLflow run, continued
    metrics = registry.client.get_run(resumed.run_id).data.metrics
    assert metrics["resumed_from_step"] >= 4
    steps = logged_steps(registry, resumed.run_id, "train_loss")
    assert sorted(set(steps)) == list(range(1, 41))
    assert steps.count(1) == 1  # steps before the checkpoint were not trained again

    monkeypatch.setenv("LORA_OPS_TRAINING_PROCESSES", "1")
    whole_data = replace(dataset, customer="ranks-whole")
    whole = pipeline.train_candidate(whole_data, LONG_CONFIG, progress=False)
    difference = largest_relative_difference(
        adapter_weights(registry, resumed.run_id, tmp_path),
        adapter_weights(registry, whole.run_id, tmp_path),
    )
    print(f"largest relative weight difference, resumed two processes vs one: {difference:.2e}")
    assert difference <= RELATIVE
