"""Tag names (a contract with people and with the runs already recorded) and their checks."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from lora_ops.errors import InputError
from lora_ops.lora.spec import LoraSpec
from lora_ops.registry import tags

KEY = "c" * 64


def design_tags(**changes: Any) -> dict[str, Any]:
    made = tags.adapter_tags(
        base_model="tiny-llama",
        base_model_sha256="a" * 64,
        dataset_sha256="b" * 64,
        lora=LoraSpec(r=4, alpha=8.0, target_modules=("v_proj", "q_proj")),
        eval_loss=1.23456789,
        base_eval_loss=2.5,
        gate_passed=True,
    )
    return {**made, **changes}


def test_tag_names_are_the_ones_people_and_recorded_runs_use() -> None:
    # DESIGN.md's version tags; reviewers type `approved` in the MLflow UI; runs and
    # versions already in a registry carry these, so a new name would orphan them.
    assert tags.DESIGN_TAGS == (
        "base_model",
        "base_model_sha256",
        "dataset_sha256",
        "lora_r",
        "lora_alpha",
        "target_modules",
        "eval_loss",
        "base_eval_loss",
        "gate",
    )
    assert (tags.CUSTOMER_TAG, tags.IDEMPOTENCY_KEY_TAG, tags.ADAPTER_PATH_TAG) == (
        "customer",
        "idempotency_key",
        "adapter_path",
    )
    assert (tags.APPROVED_TAG, tags.REVIEW_TAG, tags.REVIEWED_BY_TAG) == (
        "approved",
        "review",
        "reviewed_by",
    )
    assert (tags.ADAPTER_SHA256_TAG, tags.SMOKE_OUTPUT_TAG) == ("adapter_sha256", "smoke_output")
    assert (tags.TRAINING_DONE_TAG, tags.TRAINING_DONE, tags.TRAINING_STEPS_TAG) == (
        "lora_ops.training",
        "done",
        "lora_ops.training_steps",
    )
    assert (tags.GATE_REASON_TAG, tags.GATE_VALUES) == ("gate_reason", ("passed", "failed"))


def test_adapter_tags_are_strings_in_a_fixed_form() -> None:
    made = design_tags()
    assert tuple(made) == tags.DESIGN_TAGS
    assert made["lora_r"] == "4"
    assert made["lora_alpha"] == "8.0"
    assert made["target_modules"] == "q_proj,v_proj"
    assert made["eval_loss"] == "1.23457"
    assert made["gate"] == "passed"


def test_version_tags_add_the_customer_and_the_key() -> None:
    checked = tags.version_tags("acme", design_tags(note=3), KEY)
    assert checked["customer"] == "acme"
    assert checked["idempotency_key"] == KEY
    assert checked["note"] == "3"


@pytest.mark.parametrize(
    ("given", "key", "refusal"),
    [
        (design_tags(), "not-a-key", "not a sha256"),
        (design_tags(adapter_path="x"), KEY, r"set by the registry.*adapter_path"),
        (design_tags(idempotency_key=KEY), KEY, r"set by the registry.*idempotency_key"),
        ({k: v for k, v in design_tags().items() if k != "lora_r"}, KEY, r"missing: \['lora_r'\]"),
        (design_tags(gate="maybe"), KEY, "'maybe' is not one of"),
        (design_tags(customer="globex"), KEY, "customer tag 'globex' is not 'acme'"),
    ],
    ids=["bad-key", "adapter-path", "key-tag", "missing", "gate", "other-customer"],
)
def test_version_tags_refuse(given: dict[str, Any], key: str, refusal: str) -> None:
    with pytest.raises(InputError, match=refusal):
        tags.version_tags("acme", given, key)


def test_tag_names_import_without_mlflow() -> None:
    # Importing MLflow takes seconds; the names must not cost that (see the package doc).
    code = "import sys, lora_ops.registry.tags; sys.exit('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
