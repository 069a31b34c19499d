"""Training runs on a local SQLite store: the idempotency key, params, metrics, status."""

from __future__ import annotations

import pytest

from lora_ops.config import TrainConfig
from lora_ops.errors import InputError
from lora_ops.lora import LoraSpec
from lora_ops.registry import Registry, flatten_params, idempotency_key
from lora_ops.registry.tags import CUSTOMER_TAG, IDEMPOTENCY_KEY_TAG

BASE_SHA, DATA_SHA = "a" * 64, "b" * 64
SPEC = LoraSpec(r=4, alpha=8.0)


def test_idempotency_key_is_canonical() -> None:
    config = TrainConfig(lora=LoraSpec(target_modules=("q_proj", "v_proj")))
    reordered = TrainConfig(lora=LoraSpec(target_modules=("v_proj", "q_proj")))
    same = idempotency_key(BASE_SHA, DATA_SHA, config)
    assert same == idempotency_key(BASE_SHA, DATA_SHA, reordered)
    assert same == idempotency_key(BASE_SHA, DATA_SHA, config.model_copy(update={"seed": 0}))
    assert same != idempotency_key(BASE_SHA, "c" * 64, config)
    assert same != idempotency_key(BASE_SHA, DATA_SHA, config.model_copy(update={"seed": 1}))
    with pytest.raises(InputError, match="base_sha256"):
        idempotency_key("not-a-hash", DATA_SHA, config)


def test_flatten_params_dots_nested_keys_and_truncates() -> None:
    spec = LoraSpec(r=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    flat = flatten_params({"lora": spec, "lr": 0.1, "mods": ("a", "b"), "long": "x" * 9000})
    assert flat["lora.r"] == "4"
    assert flat["lora.target_modules"] == '["q_proj", "k_proj", "v_proj", "o_proj"]'
    assert flat["lr"] == "0.1"
    assert flat["mods"] == '["a", "b"]'
    assert len(flat["long"]) == 6000


def test_run_logs_params_metrics_and_status(registry: Registry) -> None:
    with registry.run("acme-run", run_name="train") as run_id:
        registry.log_params(run_id, TrainConfig().model_dump(mode="json"))
        registry.log_metrics(run_id, {"train_loss": 2.0}, step=0)
        registry.log_metrics(run_id, {"train_loss": 1.0}, step=10)
    run = registry.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "8"
    assert run.data.params["learning_rate"] == "0.0002"
    assert run.data.metrics["train_loss"] == 1.0
    history = registry.client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in history] == [0, 10]
    experiment = registry.client.get_experiment(run.info.experiment_id)
    assert experiment.name == "lora-ops/acme-run"
    assert registry.run_url(run_id).endswith(
        f"/#/experiments/{experiment.experiment_id}/runs/{run_id}"
    )


def test_run_context_marks_a_failed_run(registry: Registry) -> None:
    with pytest.raises(RuntimeError), registry.run("acme-fail") as run_id:
        raise RuntimeError("boom")
    assert registry.client.get_run(run_id).info.status == "FAILED"


def test_find_run_by_idempotency_key(registry: Registry) -> None:
    key = idempotency_key(BASE_SHA, DATA_SHA, TrainConfig())
    assert registry.find_run("acme-find", key) is None
    run_id = registry.start_run("acme-find", tags={IDEMPOTENCY_KEY_TAG: key})
    found = registry.find_run("acme-find", key)
    assert found is not None
    assert (found.run_id, found.status) == (run_id, "RUNNING")
    assert found.tags[CUSTOMER_TAG] == "acme-find"
    assert registry.find_run("acme-find", "c" * 64) is None
    with pytest.raises(InputError, match="sha256"):
        registry.find_run("acme-find", "not-a-key")
