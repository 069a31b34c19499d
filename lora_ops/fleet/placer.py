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

import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from lora_ops.db import ACTIVE, DOWN, Database, DeployInProgress
from lora_ops.fleet.client import Fleet, ReplicaError
from lora_ops.fleet.placement import (
    DEFAULT_COPIES,
    DEFAULT_LOAD_FACTOR,
    Change,
    Placement,
    changes,
    place,
)
from lora_ops.fleet.rollout import load_and_smoke, unload
from lora_ops.registry import AdapterVersion, Registry
from lora_ops.registry.tags import BASE_MODEL_SHA256_TAG

log = logging.getLogger(__name__)

# Whoever re-plans the whole fleet (a gateway's controller, `fleet remove`) holds this lease,
# so no one records a plan made before another's changes. '~' is not in any customer id.
LEASE = "~fleet-controller"
LEASE_EXPIRY = dt.timedelta(minutes=5)  # a process that died holding it


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
    # The current placement may name drained replicas, which the wanted one has left.
    holding = {url: replicas.get(url, "") for urls in recorded.values() for url in urls}
    current = Placement(
        {c: tuple(recorded.get(c, ())) for c in customers}, replicas | holding, {}, []
    )
    return PlacementPlan(current, wanted, versions)


def rebalance(fleet: Fleet, placement_plan: PlacementPlan, limit: int | None = None) -> Rebalance:
    """Make the fleet hold ``placement_plan.wanted``, customer by customer.

    At most ``limit`` customers move per call (the rest wait for the next), so a caller
    holding a lease holds it briefly. A customer being deployed right now is left to its
    deploy, which places it itself.
    """
    done = Rebalance()
    for change in placement_plan.changes()[:limit]:
        holder = f"rebalance:{socket.gethostname()}:{os.getpid()}"
        try:
            with fleet.db.deploy_lock(change.customer, holder):
                _move(fleet, placement_plan, change)
        except DeployInProgress as exc:
            done.failed[change.customer] = str(exc)
        except ReplicaError as exc:
            log.error("%s stays where it was: %s", change.customer, exc)
            done.failed[change.customer] = str(exc)
        else:
            done.applied.append(change)
    _reorder(fleet, placement_plan)
    return done


def _reorder(fleet: Fleet, placement_plan: PlacementPlan) -> None:
    """Record a new leading copy where only the order of a customer's replicas changed.

    Nothing loads: the gateway just sends the customer's traffic to another of its copies.
    """
    recorded = placement_plan.current.assignment
    for customer, urls in placement_plan.wanted.assignment.items():
        before = recorded.get(customer, ())
        if not urls or tuple(urls) == tuple(before) or set(urls) != set(before):
            continue
        version = placement_plan.versions[customer]
        try:
            with fleet.db.deploy_lock(customer, f"reorder:{socket.gethostname()}:{os.getpid()}"):
                fleet.db.place(customer, version.tags.get(BASE_MODEL_SHA256_TAG, ""), list(urls))
        except DeployInProgress:
            continue  # the deploy records the placement itself


def _move(fleet: Fleet, placement_plan: PlacementPlan, change: Change) -> None:
    """Load and smoke-test the new copies, record the placement, unload the old copies.

    Raises:
        ReplicaError: a new copy failed; those loaded are unloaded, nothing recorded.
    """
    version = placement_plan.versions[change.customer]
    try:
        for url in change.added:
            load_and_smoke(fleet, url, change.customer, version)
    except ReplicaError:
        unload(fleet, change.added, change.customer)
        raise
    urls = placement_plan.wanted.replicas_of(change.customer)
    fleet.db.place(change.customer, version.tags.get(BASE_MODEL_SHA256_TAG, ""), urls)
    unload(fleet, change.removed, change.customer)
    log.info(
        "%s now on %s (added %s, removed %s)",
        change.customer,
        ", ".join(urls) or "no replica",
        ", ".join(change.added) or "none",
        ", ".join(change.removed) or "none",
    )


def drain(fleet: Fleet, registry: Registry, url: str, k: int, wait_s: float = 300.0) -> Rebalance:
    """Take ``url`` out of the fleet without a gap: marked down (no new traffic, out of
    placement), its customers placed on the others (loaded and smoke-tested first), then
    forgotten. A customer that could not move keeps the replica registered (``down``), so
    running it again finishes the job.

    It holds the fleet's lease while it plans and moves, waiting up to ``wait_s`` for a
    gateway's controller to finish its tick.

    Raises:
        DeployInProgress: the lease stayed held for ``wait_s``.
    """
    holder = f"drain:{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        try:
            with fleet.db.deploy_lock(LEASE, holder, LEASE_EXPIRY):
                fleet.db.set_replica_state(url, DOWN, "being removed from the fleet")
                done = rebalance(fleet, plan(fleet.db, registry, k))
                if not done.failed:
                    fleet.db.remove_replica(url)
                return done
        except DeployInProgress as exc:
            if not waited:
                log.warning("waiting up to %.0f s for the fleet's lease: %s", wait_s, exc)
                waited = True
            if time.monotonic() >= deadline:
                raise DeployInProgress(
                    f"the fleet is being re-planned by another process for over {wait_s:.0f} s "
                    f"({exc}); try again"
                ) from None
            time.sleep(0.5)
