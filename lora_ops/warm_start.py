"""Warm start: a retrain that begins from the customer's production adapter.

For incremental data, training can go on from the weights that serve today instead of a
fresh adapter. Those weights must fit the run: the same base weights (by sha256) and the
same LoRA shape and scaling; anything else is refused before a run is started, naming
what differs. The gate still compares the result with production.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_ops import names
from lora_ops.errors import InputError
from lora_ops.lora import LoraSpec
from lora_ops.lora.peft_format import read_adapter_config
from lora_ops.registry import Registry
from lora_ops.registry.tags import BASE_MODEL_SHA256_TAG, BASE_MODEL_TAG

FIELD = "warm_start"


@dataclass(frozen=True)
class WarmStart:
    """The production version a run starts from, downloaded."""

    version: str
    adapter_dir: Path


def fetch_production(
    registry: Registry, customer: str, base_sha256: str, spec: LoraSpec, dst: Path
) -> WarmStart:
    """Download ``customer``'s production adapter after checking that it fits the run.

    Args:
        registry: where the customer's versions are.
        customer: whose production adapter.
        base_sha256: the run's base weights.
        spec: the run's LoRA spec, its target modules named (not "the base's defaults").
        dst: an empty folder to download into.

    Raises:
        InputError: (field ``warm_start``) there is no production version, or it was
            trained on other base weights or with another LoRA shape or scaling.
    """
    version = registry.get_version_by_alias(customer, names.PRODUCTION)
    if version is None:
        raise InputError(
            f"{names.registered_model_name(customer)} has no production version to start "
            "from; train without warm_start (and deploy a version) first",
            field=FIELD,
        )
    where = f"production ({names.registered_model_name(customer)} version {version.version})"
    trained_on = version.tags.get(BASE_MODEL_SHA256_TAG)
    if trained_on != base_sha256:
        raise InputError(
            f"{where} was trained on base {version.tags.get(BASE_MODEL_TAG, '?')} "
            f"(weights sha256 {str(trained_on)[:12]}), not this run's base "
            f"(sha256 {base_sha256[:12]}); a warm start needs the same base",
            field=FIELD,
        )
    folder = registry.download_adapter((customer, version.version), dst)
    production_spec, _ = read_adapter_config(folder)
    problem = spec_mismatch(production_spec, spec)
    if problem is not None:
        raise InputError(
            f"{where} has {problem}; a warm start needs the same LoRA shape and scaling",
            field=FIELD,
        )
    return WarmStart(version.version, folder)


def spec_mismatch(production: LoraSpec, run: LoraSpec) -> str | None:
    """What differs between two adapters' shape and scaling, or None when one can go on
    from the other (dropout may differ: it holds no weights)."""
    differences = [
        f"{name} {getattr(production, name)!r} where this run has {getattr(run, name)!r}"
        for name in ("r", "alpha", "use_rslora")
        if getattr(production, name) != getattr(run, name)
    ]
    if sorted(production.target_modules) != sorted(run.target_modules):
        differences.append(
            f"target_modules {','.join(sorted(production.target_modules))} where this run "
            f"has {','.join(sorted(run.target_modules))}"
        )
    return "; ".join(differences) or None
