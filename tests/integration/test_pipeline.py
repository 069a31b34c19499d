"""The retrain flow end to end on tiny-llama against the real S3, MLflow and Prefect servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from lora_ops import base_models, names
from lora_ops.config import TrainConfig
from lora_ops.errors import InputError
from lora_ops.lora import LoraSpec, adapters_in_use, load_adapter
from lora_ops.pipeline import GateFailed
from lora_ops.registry import Registry
from lora_ops.registry.tags import (
    CUSTOMER_TAG,
    DATASET_SHA256_TAG,
    DESIGN_TAGS,
    GATE_PASSED,
    GATE_TAG,
)
from lora_ops.storage import Storage

pytestmark = pytest.mark.integration
SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"
CONFIG = TrainConfig(
    lora=LoraSpec(r=8, alpha=16),
    learning_rate=1e-2,
    max_steps=8,
    batch_size=4,
    max_seq_len=256,
    eval_fraction=0.2,
    checkpoint_every=4,
)


def write_data(path: Path, lines: slice) -> Path:
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[lines]))
    return path


def run_retrain(customer: str, data_uri: str, **kwargs: Any) -> dict[str, Any]:
    from flows.retrain import retrain  # after the stack fixture has set PREFECT_API_URL

    options: dict[str, Any] = {"base": "tiny-llama", "config": CONFIG, "min_improvement": 0.001}
    options.update(kwargs)
    return retrain(customer=customer, data_uri=data_uri, **options)


def bucket_keys(stack: Any, prefix: str) -> list[str]:
    storage = Storage.from_settings(stack.settings)
    return storage.list_keys(names.s3_uri(stack.settings.bucket, prefix))


def test_retrain_registers_a_candidate_with_files_peft_loads(
    stack: Any, tmp_path: Path, tiny_base: Path
) -> None:
    data_file = write_data(tmp_path / "acme.jsonl", slice(0, 40))
    result = run_retrain("acme", str(data_file))
    assert result["new_version"] is True
    registry = Registry(stack.settings.mlflow_tracking_uri)
    version = registry.get_version_by_alias("acme", "candidate")
    assert version is not None
    assert str(version.version) == result["version"] == "1"
    for tag in (CUSTOMER_TAG, *DESIGN_TAGS):
        assert tag in version.tags, tag
    assert version.tags[GATE_TAG] == GATE_PASSED
    assert version.tags[DATASET_SHA256_TAG] == result["dataset_sha256"]
    assert bucket_keys(stack, f"datasets/acme/{result['dataset_sha256']}/")
    assert any(k.endswith("adapter_model.safetensors") for k in bucket_keys(stack, "mlflow/"))

    adapter_dir = registry.download_adapter(("acme", "candidate"), tmp_path / "dl")
    ids = torch.arange(10, 30).reshape(2, 10)
    peft_model = PeftModel.from_pretrained(base_models.load_model(tiny_base, "cpu"), adapter_dir)
    ours = base_models.load_model(tiny_base, "cpu")
    load_adapter(ours, adapter_dir)
    with torch.no_grad(), adapters_in_use(ours, "default"):
        expected = ours(input_ids=ids).logits
        base = peft_model.get_base_model()
        assert (peft_model(input_ids=ids).logits - expected).abs().max() <= 1e-4
    del base
    run = registry.client.get_run(result["run_id"])
    assert float(run.data.metrics["eval_loss"]) < float(run.data.metrics["base_eval_loss"])
    assert "learning_rate" in run.data.metrics
    # the compute inside the flow, which bench/pipeline.py sets against its wall time
    for seconds in ("train_step_seconds", "train_eval_seconds", "evaluate_seconds"):
        assert run.data.metrics[seconds] > 0, seconds
    assert run.data.params["base_model"] == "tiny-llama"
    artifacts = [a.path for a in registry.client.list_artifacts(result["run_id"], "plots")]
    assert "plots/loss_curve.png" in artifacts

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["eval-acme"]))
        )
    assert artifacts
    assert "# acme: gate passed" in str(artifacts[0].data)

    again = run_retrain("acme", str(data_file))
    assert again["new_version"] is False
    assert again["version"] == "1"
    changed = run_retrain("acme", str(write_data(tmp_path / "acme2.jsonl", slice(0, 44))))
    assert changed["new_version"] is True
    assert changed["version"] == "2"


@pytest.mark.long  # make test-slow; tests/flows checks a failed gate registers nothing
def test_gate_too_high_registers_nothing(stack: Any, tmp_path: Path) -> None:
    data_file = write_data(tmp_path / "globex.jsonl", slice(40, 80))
    with pytest.raises(GateFailed, match=r"the gate needs at least 99\.0%"):
        run_retrain("globex", str(data_file), min_improvement=0.99)
    registry = Registry(stack.settings.mlflow_tracking_uri)
    assert registry.latest_versions("globex") == []


def test_bad_data_fails_in_prep_and_leaves_nothing(stack: Any, tmp_path: Path) -> None:
    lines = SAMPLE.read_text().splitlines()[:20]
    lines[4] = '{"messages": [{"role": "user", "content": "hi"}]}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=f"{bad}:5:.*assistant"):
        run_retrain("initech", str(bad))
    assert Registry(stack.settings.mlflow_tracking_uri).latest_versions("initech") == []
    assert bucket_keys(stack, "datasets/initech/") == []


def test_data_from_s3(stack: Any, tmp_path: Path) -> None:
    storage = Storage.from_settings(stack.settings)
    uri = names.s3_uri(stack.settings.bucket, "uploads/hooli/data.jsonl")
    storage.upload_file(write_data(tmp_path / "h.jsonl", slice(80, 120)), uri)
    result = run_retrain("hooli", uri)
    assert result["version"] == "1"
    assert json.loads(json.dumps(result["gate"]))["passed"] is True


def test_cli_pipeline_run_and_pyfunc_over_the_server(stack: Any, tmp_path: Path) -> None:
    import mlflow
    from typer.testing import CliRunner

    from lora_ops.cli import app

    data_file = write_data(tmp_path / "vandelay.jsonl", slice(200, 240))
    result = CliRunner().invoke(
        app,
        [
            "pipeline",
            "run",
            "--customer",
            "vandelay",
            "--data",
            str(data_file),
            "--base",
            "tiny-llama",
            "--rank",
            "8",
            "--lr",
            "1e-2",
            "--max-steps",
            "8",
            "--batch-size",
            "4",
            "--max-seq-len",
            "256",
            "--min-improvement",
            "0.001",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "registered adapter-vandelay version 1 with alias 'candidate'" in result.output
    assert "MLflow run:" in result.output
    model = mlflow.pyfunc.load_model("models:/adapter-vandelay@candidate")
    replies = model.predict(["How much is the Pro Anvil?"], params={"max_new_tokens": 4})
    assert len(replies) == 1
    assert isinstance(replies[0], str)
    bad = CliRunner().invoke(app, ["pipeline", "run", "--customer", "Bad Name", "--data", "x"])
    assert bad.exit_code != 0
    assert "not a customer id" in str(bad.exception)
