"""MLflow, lora-ops's record of training runs and registered adapter versions.

``tracking`` (runs, the idempotency key) · ``versions`` (register, aliases, files) ·
``tags`` (every tag name) · ``review`` (the reviewer's decision, a version tag) ·
``connection`` (the client the parts share, its errors) · ``client`` (:class:`Registry`,
the parts on one connection). Callers get :class:`AdapterVersion` / :class:`TrainingRun`,
never an MLflow entity; only this package and :mod:`lora_ops.adapter_pyfunc` import MLflow.

The names below load their module on first use: importing MLflow takes seconds, and
``lora_ops.registry.tags`` (names only) must not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Each public name and the submodule it lives in.
_HOMES = {
    "Registry": "client",
    "ArtifactsUnavailable": "connection",
    "RegistryUnavailable": "connection",
    "RUN_STATUSES": "tracking",
    "TrainingRun": "tracking",
    "flatten_params": "tracking",
    "idempotency_key": "tracking",
    "AdapterVersion": "versions",
    "LOGGED_MODEL_NAME": "versions",
    "READY_TIMEOUT_S": "versions",
    "ADAPTER_PATH_TAG": "tags",
    "DESIGN_TAGS": "tags",
    "GATE_VALUES": "tags",
    "IDEMPOTENCY_KEY_TAG": "tags",
    "adapter_tags": "tags",
}

__all__ = [
    "ADAPTER_PATH_TAG",
    "DESIGN_TAGS",
    "GATE_VALUES",
    "IDEMPOTENCY_KEY_TAG",
    "LOGGED_MODEL_NAME",
    "READY_TIMEOUT_S",
    "RUN_STATUSES",
    "AdapterVersion",
    "ArtifactsUnavailable",
    "Registry",
    "RegistryUnavailable",
    "TrainingRun",
    "adapter_tags",
    "flatten_params",
    "idempotency_key",
]

if TYPE_CHECKING:
    from lora_ops.registry.client import Registry
    from lora_ops.registry.connection import ArtifactsUnavailable, RegistryUnavailable
    from lora_ops.registry.tags import (
        ADAPTER_PATH_TAG,
        DESIGN_TAGS,
        GATE_VALUES,
        IDEMPOTENCY_KEY_TAG,
        adapter_tags,
    )
    from lora_ops.registry.tracking import (
        RUN_STATUSES,
        TrainingRun,
        flatten_params,
        idempotency_key,
    )
    from lora_ops.registry.versions import LOGGED_MODEL_NAME, READY_TIMEOUT_S, AdapterVersion
else:

    def __getattr__(name: str) -> Any:
        """Import a public name's module when the name is first asked for (PEP 562)."""
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
        globals()[name] = value
        return value
