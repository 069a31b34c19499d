"""Placement made true on the fleet: each production adapter on its replicas, and only there.

:mod:`~lora_ops.fleet.placement` says where adapters should live; this module makes the
replicas agree, in an order that never sends a caller to a replica without the adapter:

1. a customer's new replicas load its production version and answer the smoke prompt as
   registration recorded;
2. only then is the new placement recorded in the service database (the gateway routes by
   it);
3. then the replicas that lost the customer unload it (best effort: an unreachable one is
   already out of rotation, and its copy is harmless).

A customer whose load or smoke test fails keeps its old placement, and the failure is
reported; the others go on. The replicas planned for are the active ones whose base is
known; a drained replica (``down``) holds nothing until it is back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from lora_ops.db import ACTIVE, Database
from lora_ops.fleet.client import Fleet, ReplicaError
from lora_ops.fleet.placement import (
    DEFAULT_COPIES,
    DEFAULT_LOAD_FACTOR,
    Change,
    Placement,
    changes,
    place,
)
from lora_ops.fleet.rollout import load_and_smoke
from lora_ops.registry import AdapterVersion, Registry
from lora_ops.registry.tags import BASE_MODEL_SHA256_TAG

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlacementPlan:
    """What the fleet holds now, what it should hold, and the versions to load."""

    current: Placement
    wanted: Placement
    versions: Mapping[str, AdapterVersion]

    def changes(self) -> list[Change]:
        return changes(self.current, self.wanted)


@dataclass
class Rebalance:
    """What a rebalance did: the changes made, and the customers that could not move."""

    applied: list[Change] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # customer -> why


def active_replicas(db: Database) -> dict[str, str]:
    """url -> base sha256 of every replica in rotation whose base is known."""
    return {r.url: r.base_sha256 for r in db.replicas() if r.state == ACTIVE and r.base_sha256}


def plan(
    db: Database,
    registry: Registry,
    k: int = DEFAULT_COPIES,
    load_factor: float = DEFAULT_LOAD_FACTOR,
    copies: Mapping[str, int] | None = None,
) -> PlacementPlan:
    """Where every production adapter should live, against where it does."""
    versions = dict(registry.production_versions())
    customers = {c: v.tags.get(BASE_MODEL_SHA256_TAG, "") for c, v in versions.items()}
    replicas = active_replicas(db)
    hot = {c: n for c, n in (copies or {}).items() if c in customers}
    wanted = place(customers, replicas, k, load_factor, hot)
    recorded = {c: urls for c, urls in db.placements().items() if c in customers}
    current = Placement({c: tuple(recorded.get(c, ())) for c in customers}, replicas, {}, [])
    return PlacementPlan(current, wanted, versions)


def rebalance(fleet: Fleet, registry: Registry, placement_plan: PlacementPlan) -> Rebalance:
    """Make the fleet hold ``placement_plan.wanted``, customer by customer."""
    done = Rebalance()
    for change in placement_plan.changes():
        version = placement_plan.versions[change.customer]
        try:
            for url in change.added:
                load_and_smoke(fleet, url, change.customer, version)
        except ReplicaError as exc:
            log.error("%s stays where it was: %s", change.customer, exc)
            done.failed[change.customer] = str(exc)
            _unload(fleet, change.added, change.customer)
            continue
        urls = placement_plan.wanted.replicas_of(change.customer)
        fleet.db.place(change.customer, version.tags.get(BASE_MODEL_SHA256_TAG, ""), urls)
        _unload(fleet, change.removed, change.customer)
        done.applied.append(change)
    return done


def _unload(fleet: Fleet, urls: tuple[str, ...], customer: str) -> None:
    for url in urls:
        try:
            fleet.unload(url, customer)
        except ReplicaError as exc:
            log.warning("could not unload %s from %s: %s", customer, url, exc.reason)
