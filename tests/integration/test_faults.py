"""Faults during the retrain flow: a killed training process, S3 going away mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lora_ops import names
from lora_ops import stack as embedded
from lora_ops.registry import Registry
from lora_ops.storage import Storage

pytestmark = pytest.mark.integration
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
    """Every version and alias points at adapter files that are in the bucket."""
    registry = Registry(stack.settings.mlflow_tracking_uri)
    for version in registry.latest_versions(customer, n=50):
        folder = registry.download_adapter(
            (customer, str(version.version)), work / str(version.version)
        )
        assert (folder / "adapter_model.safetensors").is_file()
        assert (folder / "adapter_config.json").is_file()


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
