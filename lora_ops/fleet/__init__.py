"""The serving fleet: the replicas' HTTP client, the smoke test, and all-or-nothing rollout.

``client`` holds every HTTP call to a replica; ``smoke`` the fixed prompt a deployed adapter
must answer as it did at registration; ``rollout`` deploys a version to every replica or to
none, and rolls back. The client and the smoke test import here at once; the rollout
names load on first use, because ``rollout`` reaches MLflow and torch through the registry
and the CLI's fleet commands (and ``--help``) must not wait for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lora_ops.fleet.client import BaseIdentity, Fleet, ReplicaError, ReplicaHealth, check_url
from lora_ops.fleet.smoke import SMOKE_MAX_TOKENS, SMOKE_MESSAGES, smoke_reply

if TYPE_CHECKING:
    from lora_ops.fleet.rollout import (
        DeployFailed,
        DeployOutcome,
        deploy,
        resolve_version,
        rollback,
        version_uri,
    )

_ROLLOUT_NAMES = frozenset(
    {"DeployFailed", "DeployOutcome", "deploy", "resolve_version", "rollback", "version_uri"}
)

__all__ = [
    "SMOKE_MAX_TOKENS",
    "BaseIdentity",
    "SMOKE_MESSAGES",
    "DeployFailed",
    "DeployOutcome",
    "Fleet",
    "ReplicaError",
    "ReplicaHealth",
    "check_url",
    "deploy",
    "resolve_version",
    "rollback",
    "smoke_reply",
    "version_uri",
]


def __getattr__(name: str) -> Any:
    """Load ``rollout`` the first time one of its names is asked for (PEP 562)."""
    if name in _ROLLOUT_NAMES:
        return getattr(importlib.import_module("lora_ops.fleet.rollout"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
