"""Validation that steers training, and warm start, through the retrain flow on tiny-llama
against the real S3, MLflow and Prefect servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lora_ops.config import TrainConfig
from lora_ops.errors import InputError
from lora_ops.lora import LoraSpec
from lora_ops.registry import Registry
from lora_ops.registry.tags import EVAL_LOSS_TAG, WARM_START_TAG, WARM_START_VERSION_TAG

pytestmark = pytest.mark.integration
SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"
# Far too long for 12 training examples at a high learning rate: tiny-llama overfits them.
OVERLONG = TrainConfig(
    lora=LoraSpec(r=8, alpha=32, target_modules=("all-linear",)),
    learning_rate=3e-2,
    max_steps=24,
    batch_size=4,
    warmup_ratio=0.0,
    max_seq_len=256,
    eval_fraction=0.3,
    eval_every=2,
)


def write_data(path: Path, lines: slice) -> Path:
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[lines]))
    return path


def run_retrain(customer: str, data_uri: str, config: TrainConfig, **kwargs: Any) -> Any:
    from flows.retrain import retrain  # after the stack fixture has set PREFECT_API_URL

    return retrain(
        customer=customer,
        data_uri=data_uri,
        base="tiny-llama",
        config=config,
        min_improvement=0.001,
        **kwargs,
    )


def test_the_registered_adapter_is_the_best_evaluated_checkpoint(
    stack: Any, tmp_path: Path
) -> None:
    result = run_retrain("steer", str(write_data(tmp_path / "d.jsonl", slice(0, 16))), OVERLONG)
    registry = Registry(stack.settings.mlflow_tracking_uri)
    history = registry.client.get_metric_history(result["run_id"], "val_loss")
    by_step = {m.step: m.value for m in history}
    assert sorted(by_step) == list(range(2, 25, 2))
    best_step = min(by_step, key=by_step.__getitem__)
    assert by_step[best_step] < by_step[24]  # it overfitted: the last step is not the best
    run = registry.client.get_run(result["run_id"])
    assert run.data.metrics["best_val_step"] == best_step
    assert run.data.params["eval_every"] == "2"
    # evaluate (another process's load of the registered files) measures the kept weights
    assert run.data.metrics["eval_loss"] == pytest.approx(by_step[best_step], rel=1e-5)
    version = registry.get_version("steer", result["version"])
    assert float(version.tags[EVAL_LOSS_TAG]) == pytest.approx(by_step[best_step], rel=1e-5)
    assert float(version.tags[EVAL_LOSS_TAG]) < by_step[24]


def test_a_warm_start_goes_on_from_production_and_says_so(stack: Any, tmp_path: Path) -> None:
    # No production version, and one of another base: tests/unit/test_warm_start.py.
    config = OVERLONG.model_copy(update={"max_steps": 2, "eval_every": None})
    warm = config.model_copy(update={"warm_start": "production"})
    first = run_retrain("warm", str(write_data(tmp_path / "a.jsonl", slice(0, 16))), config)
    registry = Registry(stack.settings.mlflow_tracking_uri)
    registry.set_alias("warm", "production", first["version"])

    more = run_retrain("warm", str(write_data(tmp_path / "b.jsonl", slice(0, 20))), warm)
    version = registry.get_version("warm", more["version"])
    assert version.tags[WARM_START_TAG] == "production"
    assert version.tags[WARM_START_VERSION_TAG] == first["version"]
    run = registry.client.get_run(more["run_id"])
    assert run.data.params["warm_start"] == "production"
    assert run.data.params["warm_start_version"] == first["version"]
    assert "production_eval_loss" in run.data.metrics  # the gate still compares with production

    other_rank = warm.model_copy(update={"lora": LoraSpec(r=4, target_modules=("all-linear",))})
    with pytest.raises(InputError, match="has r 8 where this run has 4") as refused:
        run_retrain("warm", str(write_data(tmp_path / "c.jsonl", slice(0, 24))), other_rank)
    assert refused.value.field == "warm_start"
