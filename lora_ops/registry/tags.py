"""Every MLflow tag name lora-ops writes or reads, on runs, versions, experiments and models.

Names only, no MLflow import, so anything may import them for free. The version tags are a
contract with people: DESIGN.md lists them, reviewers set ``approved`` by hand in the
MLflow UI, and searches filter on ``review``; a name here changes only with DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lora_ops import names
from lora_ops.errors import InputError

if TYPE_CHECKING:  # lora_ops.lora imports torch; only the annotation needs it
    from lora_ops.lora.spec import LoraSpec

# On experiments, runs, registered models and versions alike.
CUSTOMER_TAG = "customer"
# On runs and versions: the sha256 of (base weights, dataset, training config).
IDEMPOTENCY_KEY_TAG = "idempotency_key"
# On runs and versions: "passed" or "failed".
GATE_TAG = "gate"
GATE_PASSED, GATE_FAILED = "passed", "failed"
GATE_VALUES = (GATE_PASSED, GATE_FAILED)

# -- run tags ---------------------------------------------------------------------------

TRAINING_DONE_TAG = "lora_ops.training"  # TRAINING_DONE once the run's training finished
TRAINING_DONE = "done"
TRAINING_STEPS_TAG = "lora_ops.training_steps"  # optimizer steps the training took
# The production version a warm-started run began from (see lora_ops.warm_start).
WARM_START_VERSION_RUN_TAG = "lora_ops.warm_start_version"
GATE_REASON_TAG = "gate_reason"  # the gate's one-line why

# -- version tags -----------------------------------------------------------------------

BASE_MODEL_TAG = "base_model"
BASE_MODEL_SHA256_TAG = "base_model_sha256"
DATASET_SHA256_TAG = "dataset_sha256"
LORA_R_TAG = "lora_r"
LORA_ALPHA_TAG = "lora_alpha"
TARGET_MODULES_TAG = "target_modules"
EVAL_LOSS_TAG = "eval_loss"
BASE_EVAL_LOSS_TAG = "base_eval_loss"
# DESIGN.md's version tags, all required at registration (see adapter_tags); with CUSTOMER_TAG.
DESIGN_TAGS = (
    BASE_MODEL_TAG,
    BASE_MODEL_SHA256_TAG,
    DATASET_SHA256_TAG,
    LORA_R_TAG,
    LORA_ALPHA_TAG,
    TARGET_MODULES_TAG,
    EVAL_LOSS_TAG,
    BASE_EVAL_LOSS_TAG,
    GATE_TAG,
)
ADAPTER_PATH_TAG = "adapter_path"  # where the PEFT folder sits inside the pyfunc model
# Set by the registry at registration, refused from callers.
REGISTRY_TAGS = (IDEMPOTENCY_KEY_TAG, ADAPTER_PATH_TAG)
# What a deploy checks on every replica: the weights' checksum and the smoke prompt's answer.
ADAPTER_SHA256_TAG = "adapter_sha256"
SMOKE_OUTPUT_TAG = "smoke_output"
# The reviewer's decision (see lora_ops.registry.review).
APPROVED_TAG = "approved"  # "true" or "false", set by the reviewer
REVIEW_TAG = "review"  # pending, approved or rejected: the state, for people and searches
REVIEWED_BY_TAG = "reviewed_by"
# On a warm-started version: where it began ("production") and that version's number.
WARM_START_TAG = "warm_start"
WARM_START_VERSION_TAG = "warm_start_version"


def adapter_tags(
    *,
    base_model: str,
    base_model_sha256: str,
    dataset_sha256: str,
    lora: LoraSpec,
    eval_loss: float,
    base_eval_loss: float,
    gate_passed: bool,
) -> dict[str, str]:
    """DESIGN.md's version tags (all but ``customer``, which the registry adds) as strings."""
    return {
        BASE_MODEL_TAG: base_model,
        BASE_MODEL_SHA256_TAG: base_model_sha256,
        DATASET_SHA256_TAG: dataset_sha256,
        LORA_R_TAG: str(lora.r),
        LORA_ALPHA_TAG: str(lora.alpha),
        TARGET_MODULES_TAG: ",".join(sorted(lora.target_modules)),
        EVAL_LOSS_TAG: f"{eval_loss:.6g}",
        BASE_EVAL_LOSS_TAG: f"{base_eval_loss:.6g}",
        GATE_TAG: GATE_PASSED if gate_passed else GATE_FAILED,
    }


def version_tags(customer: str, tags: Mapping[str, Any], key: str) -> dict[str, str]:
    """A new version's tags: DESIGN.md's, checked, plus ``customer`` and ``idempotency_key``.

    Raises:
        InputError: ``key`` is no sha256, a tag is missing, reserved or out of range, or
            the ``customer`` tag names someone else.
    """
    if not names.SHA256.fullmatch(key):
        raise InputError(f"{key!r} is not a sha256 hex digest", field="key")
    reserved = set(REGISTRY_TAGS) & set(tags)
    if reserved:
        raise InputError(f"set by the registry, not by callers: {sorted(reserved)}", field="tags")
    missing = [tag for tag in DESIGN_TAGS if tag not in tags]
    if missing:
        raise InputError(f"version tags missing: {missing} (see adapter_tags)", field="tags")
    if tags[GATE_TAG] not in GATE_VALUES:
        raise InputError(f"{tags[GATE_TAG]!r} is not one of {GATE_VALUES}", field="tags.gate")
    if tags.get(CUSTOMER_TAG, customer) != customer:
        raise InputError(f"customer tag {tags[CUSTOMER_TAG]!r} is not {customer!r}", field="tags")
    return {
        **{k: str(v) for k, v in tags.items()},
        CUSTOMER_TAG: customer,
        IDEMPOTENCY_KEY_TAG: key,
    }
