"""Warm start refuses an adapter that cannot go on: no production, another base, another shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lora_ops.errors import InputError
from lora_ops.lora import LoraSpec
from lora_ops.registry.tags import BASE_MODEL_SHA256_TAG, BASE_MODEL_TAG
from lora_ops.registry.versions import AdapterVersion
from lora_ops.warm_start import fetch_production, spec_mismatch

RUN = LoraSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
BASE_SHA = "a" * 64


@pytest.mark.parametrize(
    ("production", "named"),
    [
        (
            LoraSpec(r=16, alpha=16, target_modules=("q_proj", "v_proj")),
            "r 16 where this run has 8",
        ),
        (LoraSpec(r=8, alpha=32, target_modules=("q_proj", "v_proj")), "alpha 32"),
        (
            LoraSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj"), use_rslora=True),
            "use_rslora True",
        ),
        (LoraSpec(r=8, alpha=16, target_modules=("q_proj",)), "target_modules q_proj where"),
    ],
    ids=["rank", "alpha", "rslora", "targets"],
)
def test_a_different_shape_or_scaling_is_named(production: LoraSpec, named: str) -> None:
    problem = spec_mismatch(production, RUN)
    assert problem is not None
    assert named in problem


def test_order_of_targets_and_dropout_do_not_matter() -> None:
    same = LoraSpec(r=8, alpha=16, dropout=0.1, target_modules=("v_proj", "q_proj"))
    assert spec_mismatch(same, RUN) is None


class Versions:
    """A registry holding one production version (or none) and its adapter folder."""

    def __init__(self, version: AdapterVersion | None, folder: Path) -> None:
        self.version, self.folder, self.downloads = version, folder, 0

    def get_version_by_alias(self, customer: str, alias: str) -> AdapterVersion | None:
        assert alias == "production"
        return self.version

    def download_adapter(self, source: Any, dst: Path) -> Path:
        self.downloads += 1
        return self.folder


def version(**tags: str) -> AdapterVersion:
    return AdapterVersion("acme", "3", tags, ("production",), "run", "s3://x", "READY", "")


def test_no_production_version_is_refused(tmp_path: Path) -> None:
    registry = Versions(None, tmp_path)
    with pytest.raises(InputError, match="adapter-acme has no production version") as refused:
        fetch_production(registry, "acme", BASE_SHA, RUN, tmp_path)  # type: ignore[arg-type]
    assert refused.value.field == "warm_start"


def test_production_on_another_base_is_refused_before_downloading(tmp_path: Path) -> None:
    other = version(**{BASE_MODEL_TAG: "smollm2-135m-instruct", BASE_MODEL_SHA256_TAG: "b" * 64})
    registry = Versions(other, tmp_path)
    with pytest.raises(InputError, match=r"version 3\) was trained on base smollm2") as refused:
        fetch_production(registry, "acme", BASE_SHA, RUN, tmp_path)  # type: ignore[arg-type]
    assert refused.value.field == "warm_start"
    assert registry.downloads == 0


def test_production_of_another_shape_is_refused(tmp_path: Path, tiny_model: Any) -> None:
    from lora_ops.lora import apply_lora, save_adapter

    apply_lora(tiny_model, LoraSpec(r=4, alpha=16, target_modules=("q_proj", "v_proj")))
    save_adapter(tiny_model, tmp_path / "prod", base_model_name_or_path="tiny-llama")
    registry = Versions(version(**{BASE_MODEL_SHA256_TAG: BASE_SHA}), tmp_path / "prod")
    with pytest.raises(InputError, match="has r 4 where this run has 8; a warm start needs"):
        fetch_production(registry, "acme", BASE_SHA, RUN, tmp_path)  # type: ignore[arg-type]
    fits = LoraSpec(r=4, alpha=16, target_modules=("q_proj", "v_proj"))
    warm = fetch_production(registry, "acme", BASE_SHA, fits, tmp_path)  # type: ignore[arg-type]
    assert (warm.version, warm.adapter_dir) == ("3", tmp_path / "prod")
