"""The consistency checker: the registry, its aliases and the bucket agree with each other.

After any fault, for one customer:
- every alias points at a version that exists;
- every version's adapter downloads, and its weights have the sha256 recorded at
  registration; its gate passed; no two versions hold the same base, data and config;
- every version's dataset is complete in the bucket (a manifest, and the prompts);
- every folder in the bucket that has a manifest downloads whole, each file matching the
  sha256 the manifest lists (a folder without one is an unfinished upload that readers
  treat as absent).
"""

from __future__ import annotations

from pathlib import Path

from lora_ops import names
from lora_ops.errors import LoraOpsError
from lora_ops.files import sha256_file
from lora_ops.fleet.smoke import ADAPTER_SHA256_TAG
from lora_ops.registry import Registry
from lora_ops.settings import Settings
from lora_ops.storage import MANIFEST, Storage

WEIGHTS = "adapter_model.safetensors"


def check_consistency(settings: Settings, customer: str, work: Path) -> list[str]:
    """Every problem found for ``customer`` (empty when all agrees)."""
    registry = Registry(settings.mlflow_tracking_uri)
    storage = Storage.from_settings(settings)
    problems: list[str] = []
    versions = registry.latest_versions(customer, 1000)
    numbers = {str(version.version) for version in versions}
    for alias, number in registry.get_aliases(customer).items():
        if number is not None and number not in numbers:
            problems.append(f"alias {alias} points at version {number}, which does not exist")
    seen_keys: dict[str, str] = {}
    for version in versions:
        number, tags = str(version.version), version.tags
        folder = registry.download_adapter((customer, number), work / f"v{number}")
        if sha256_file(folder / WEIGHTS) != tags.get(ADAPTER_SHA256_TAG):
            problems.append(f"version {number}: weights differ from the recorded sha256")
        if tags.get("gate") != "passed":
            problems.append(f"version {number}: registered with gate {tags.get('gate')!r}")
        key = tags.get("idempotency_key", "")
        if key in seen_keys:
            problems.append(f"versions {seen_keys[key]} and {number} hold the same training")
        seen_keys[key] = number
        root = names.s3_uri(settings.bucket, names.dataset_prefix(customer, tags["dataset_sha256"]))
        listed = storage.list_keys(root)
        if not any(k.endswith(f"/{MANIFEST}") for k in listed) or not storage.exists(
            root + "prompts.json"
        ):
            problems.append(f"version {number}: its dataset {root} is not complete")
    problems += _check_complete_folders(settings, storage, customer, work / "folders")
    return problems


def _check_complete_folders(
    settings: Settings, storage: Storage, customer: str, work: Path
) -> list[str]:
    """Each folder with a manifest downloads whole, every file verified against it."""
    problems = []
    for top in ("datasets", "checkpoints"):
        prefix = names.s3_uri(settings.bucket, f"{top}/{customer}/")
        for index, key in enumerate(k for k in storage.list_keys(prefix) if k.endswith(MANIFEST)):
            folder = names.s3_uri(settings.bucket, key.removesuffix(MANIFEST))
            try:
                storage.download_dir(folder, work / f"{top}-{index}")  # sha256 of every file
            except LoraOpsError as exc:
                problems.append(f"{folder}: {exc}")
    return problems
