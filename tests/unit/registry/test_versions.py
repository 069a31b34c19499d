"""Registered versions on a local SQLite store: register, idempotency, aliases, files, pyfunc."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from transformers import PreTrainedModel

from lora_ops import base_models
from lora_ops.config import TrainConfig
from lora_ops.errors import InputError
from lora_ops.lora import LoraSpec, apply_lora, save_adapter
from lora_ops.registry import Registry, adapter_tags, idempotency_key
from lora_ops.registry.tags import (
    ADAPTER_PATH_TAG,
    CUSTOMER_TAG,
    DESIGN_TAGS,
    EVAL_LOSS_TAG,
    GATE_PASSED,
    GATE_TAG,
    IDEMPOTENCY_KEY_TAG,
    LORA_R_TAG,
)
from tests.helpers import randomize_adapter

BASE_SHA, DATA_SHA = "a" * 64, "b" * 64
SPEC = LoraSpec(r=4, alpha=8.0)


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two PEFT folders on tiny-llama with different random weights."""
    folders = []
    for seed in (1, 2):
        model: PreTrainedModel = base_models.load_model(tiny_base, device="cpu")
        apply_lora(model, SPEC)
        randomize_adapter(model, "default", seed=seed)
        folder = tmp_path_factory.mktemp(f"adapter-{seed}")
        folders.append(save_adapter(model, folder, base_model_name_or_path="tiny-llama"))
    return folders


def tags(eval_loss: float = 1.5) -> dict[str, str]:
    return adapter_tags(
        base_model="tiny-llama",
        base_model_sha256=BASE_SHA,
        dataset_sha256=DATA_SHA,
        lora=SPEC,
        eval_loss=eval_loss,
        base_eval_loss=2.5,
        gate_passed=True,
    )


def key(learning_rate: float = 2e-4) -> str:
    return idempotency_key(BASE_SHA, DATA_SHA, TrainConfig(learning_rate=learning_rate))


def register(registry: Registry, customer: str, adapter: Path, k: str) -> Any:
    run_id = registry.start_run(customer)
    version = registry.register_adapter(customer, run_id, adapter, tags(), "test", k)
    registry.end_run(run_id)
    return version


def test_register_creates_candidate_with_every_tag(
    registry: Registry, adapters: list[Path], tmp_path: Path
) -> None:
    version = register(registry, "acme-tags", adapters[0], key())
    assert str(version.version) == "1"
    assert version.status == "READY"
    assert version.aliases == ("candidate",)
    assert version.description == "test"
    assert set(DESIGN_TAGS) <= set(version.tags)
    assert version.tags[CUSTOMER_TAG] == "acme-tags"
    assert version.tags[IDEMPOTENCY_KEY_TAG] == key()
    assert version.tags[ADAPTER_PATH_TAG] == "artifacts/adapter"
    assert version.tags[LORA_R_TAG] == "4"
    assert version.tags[GATE_TAG] == GATE_PASSED
    outputs = registry.client.get_run(version.run_id).outputs
    assert outputs is not None
    (output,) = outputs.model_outputs
    logged = registry.client.get_logged_model(output.model_id)
    assert logged.status == "READY"
    assert version.source == logged.artifact_location
    folder = registry.download_adapter(f"models:/{logged.model_id}", tmp_path / "dl")
    assert (folder / "adapter_config.json").is_file()


def test_find_version_by_key_and_idempotent_register(
    registry: Registry, adapters: list[Path]
) -> None:
    first = register(registry, "acme-key", adapters[0], key())
    found = registry.find_version("acme-key", key())
    assert found is not None
    assert found.version == first.version
    assert registry.find_version("acme-key", key(learning_rate=1e-3)) is None
    again = register(registry, "acme-key", adapters[1], key())
    assert again.version == first.version
    assert [str(v.version) for v in registry.latest_versions("acme-key")] == ["1"]


def test_second_registration_and_promotion(registry: Registry, adapters: list[Path]) -> None:
    register(registry, "acme-promo", adapters[0], key())
    second = register(registry, "acme-promo", adapters[1], key(learning_rate=1e-3))
    assert str(second.version) == "2"
    assert [str(v.version) for v in registry.latest_versions("acme-promo")] == ["2", "1"]
    candidate = registry.get_version_by_alias("acme-promo", "candidate")
    assert candidate is not None
    assert str(candidate.version) == "2"
    assert registry.get_version_by_alias("acme-promo", "production") is None

    registry.promote_to_production("acme-promo", 1)
    assert registry.get_aliases("acme-promo") == {
        "candidate": "2",
        "production": "1",
        "previous": None,
    }
    registry.promote_to_production("acme-promo", 2)
    assert registry.get_aliases("acme-promo")["production"] == "2"
    assert registry.get_aliases("acme-promo")["previous"] == "1"
    registry.promote_to_production("acme-promo", 1)  # a rollback swaps the two
    assert registry.get_aliases("acme-promo")["production"] == "1"
    assert registry.get_aliases("acme-promo")["previous"] == "2"


def test_failed_promotion_restores_aliases(
    registry: Registry, adapters: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    register(registry, "acme-undo", adapters[0], key())
    register(registry, "acme-undo", adapters[1], key(learning_rate=1e-3))
    registry.promote_to_production("acme-undo", 1)
    before = registry.get_aliases("acme-undo")
    real = registry.client.set_registered_model_alias

    def fail_on_production(name: str, alias: str, version: str) -> None:
        if alias == "production":
            raise RuntimeError("registry went away")
        real(name, alias, version)

    monkeypatch.setattr(registry.client, "set_registered_model_alias", fail_on_production)
    with pytest.raises(RuntimeError, match="went away"):
        registry.promote_to_production("acme-undo", 2)
    assert registry.get_aliases("acme-undo") == before


def test_get_version_by_alias_is_none_when_missing(registry: Registry) -> None:
    assert registry.get_version_by_alias("acme-nobody", "production") is None
    assert registry.latest_versions("acme-nobody") == []


def test_failure_after_version_creation_leaves_no_version(
    registry: Registry, adapters: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("alias refused")

    monkeypatch.setattr(registry.client, "set_registered_model_alias", refuse)
    with pytest.raises(RuntimeError, match="alias refused"):
        register(registry, "acme-half", adapters[0], key())
    assert registry.latest_versions("acme-half") == []
    assert registry.find_version("acme-half", key()) is None


def test_register_refuses_bad_input_before_any_io(registry: Registry, adapters: list[Path]) -> None:
    incomplete = {k: v for k, v in tags().items() if k != EVAL_LOSS_TAG}
    with pytest.raises(InputError, match=EVAL_LOSS_TAG):
        registry.register_adapter("acme-bad", "no-run", adapters[0], incomplete, "", key())
    with pytest.raises(InputError, match="adapter_config.json"):
        registry.register_adapter("acme-bad", "no-run", adapters[0].parent, tags(), "", key())
    with pytest.raises(InputError, match="customer"):
        registry.register_adapter("Acme Bad", "no-run", adapters[0], tags(), "", key())
    assert registry.client.get_experiment_by_name("lora-ops/acme-bad") is None


def test_register_refuses_another_customers_run(registry: Registry, adapters: list[Path]) -> None:
    run_id = registry.start_run("acme-other")
    with pytest.raises(InputError, match="acme-other"):
        registry.register_adapter("acme-mine", run_id, adapters[0], tags(), "", key())
    assert registry.latest_versions("acme-mine") == []


@pytest.mark.parametrize(
    "source",
    [("acme-dl", "candidate"), ("acme-dl", 1), "models:/adapter-acme-dl@candidate"],
    ids=["alias", "version", "models-uri"],
)
def test_download_adapter_returns_the_same_bytes(
    registry: Registry, adapters: list[Path], tmp_path: Path, source: Any
) -> None:
    if registry.get_version_by_alias("acme-dl", "candidate") is None:
        register(registry, "acme-dl", adapters[0], key())
    folder = registry.download_adapter(source, tmp_path / "dl")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).read_bytes() == (adapters[0] / name).read_bytes()


def test_download_adapter_refuses_a_missing_alias(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no alias"):
        registry.download_adapter(("acme-nobody", "production"), tmp_path)


def test_pyfunc_model_answers_prompts(
    registry: Registry, adapters: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    register(registry, "acme-serve", adapters[0], key())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)  # load_model is global
    model = mlflow.pyfunc.load_model("models:/adapter-acme-serve@candidate")
    replies = model.predict(["Hi"], params={"max_new_tokens": 4})
    assert isinstance(replies, list)
    assert len(replies) == 1
    assert isinstance(replies[0], str)
    assert len(model.predict(pd.DataFrame({"prompt": ["a", "b"]}))) == 2
    assert len(model.predict({"prompt": "a"}, params={"max_new_tokens": 2})) == 1
