"""Promoting an adapter version to the customer's replicas, all or nothing.

The customer's replicas are its placement (:mod:`~lora_ops.fleet.placement`: k active
replicas of the adapter's base). Each loads the version under a staged name and answers
the smoke prompt as recorded at registration; only then does alias ``production`` move
(the old one becomes ``previous``), the replicas serve the version under the customer's
name, and the placement is recorded. Callers reach only the customer's name, so they are
never answered by a version that is not ``production``. If any replica fails at any step,
each goes back to what it served before and the aliases stay as they were. Deploys of one
customer never overlap (a database lock).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from lora_ops import customers, names
from lora_ops.db import ACTIVE, Database
from lora_ops.errors import InputError, LoraOpsError
from lora_ops.fleet.client import Fleet, ReplicaError
from lora_ops.fleet.placement import place
from lora_ops.registry import AdapterVersion, Registry, review
from lora_ops.registry.tags import (
    ADAPTER_SHA256_TAG,
    APPROVED_TAG,
    BASE_MODEL_SHA256_TAG,
    SMOKE_OUTPUT_TAG,
)
from lora_ops.settings import get_settings

log = logging.getLogger(__name__)


class DeployFailed(LoraOpsError):
    """A replica failed; every replica was put back and the aliases were left alone."""


@dataclass(frozen=True)
class DeployOutcome:
    customer: str
    version: str
    previous: str | None
    replicas: list[str]


def version_uri(customer: str, version: str) -> str:
    return f"models:/{names.registered_model_name(customer)}/{version}"


def resolve_version(
    registry: Registry, customer: str, version: str | None, alias: str
) -> AdapterVersion:
    if version is not None:
        try:
            return registry.get_version(customer, version)
        except Exception:
            raise InputError(
                f"adapter-{customer} has no version {version}", field="version"
            ) from None
    found = registry.get_version_by_alias(customer, alias)
    if found is None:
        raise InputError(f"adapter-{customer} has no version with alias {alias!r}", field="alias")
    return found


def deploy(
    customer: str,
    version: str | None = None,
    alias: str = names.CANDIDATE,
    *,
    triggered_by: str = "cli",
    registry: Registry | None = None,
    fleet: Fleet | None = None,
) -> DeployOutcome:
    """Serve ``version`` (or the one under ``alias``) on the customer's replicas, then
    promote it."""
    names.check_customer(customer)
    registry = registry or Registry()
    fleet = fleet or Fleet()
    target = resolve_version(registry, customer, version, alias)
    if triggered_by != "rollback":  # going back to what served before needs no new review
        _check_review(fleet.db, customer, target)
    current = registry.get_version_by_alias(customer, names.PRODUCTION)
    base_sha256 = target.tags.get(BASE_MODEL_SHA256_TAG, "")
    fleet.learn_bases()
    replicas = replicas_for(fleet.db, customer, base_sha256)
    holder = f"{socket.gethostname()}:{os.getpid()}:{triggered_by}"
    with fleet.db.deploy_lock(customer, holder):
        rows = fleet.db.record_deployment_start(
            customer, str(target.version), replicas, triggered_by
        )
        try:
            _switch(fleet, registry, replicas, customer, target, current)
        except ReplicaError as exc:
            fleet.db.record_deployment_end(rows, "failed", str(exc))
            raise DeployFailed(
                f"deploy of adapter-{customer} version {target.version} failed "
                f"and was rolled back: {exc}"
            ) from None
        before = fleet.db.placements().get(customer, [])
        fleet.db.place(customer, base_sha256, replicas)
        fleet.db.record_deployment_end(rows, "succeeded", "")
    unload(fleet, [url for url in before if url not in replicas], customer)
    previous = None if current is None else str(current.version)
    log.info("adapter-%s version %s serves on %d replicas", customer, target.version, len(replicas))
    return DeployOutcome(customer, str(target.version), previous, replicas)


def _switch(
    fleet: Fleet,
    registry: Registry,
    replicas: list[str],
    customer: str,
    target: AdapterVersion,
    current: AdapterVersion | None,
) -> None:
    """Move the customer's name on ``replicas`` to ``target`` and ``production`` with it.

    The version is first loaded and smoke-tested under its staged name, which callers
    cannot reach, so until every replica passed the customer is still answered by the
    production version. Only then does the alias move and each replica load the version
    under the customer's name. Should one fail at that last step (it went away just now),
    the aliases and the replicas go back to what they were.

    Raises:
        ReplicaError: naming the replica that failed, after everything was put back.
    """
    staged = names.staged_name(customer)
    try:
        for url in replicas:
            load_and_smoke(fleet, url, customer, target, name=staged)
        aliases = registry.get_aliases(customer)
        registry.promote_to_production(customer, str(target.version))
        try:
            for url in replicas:
                _load(fleet, url, customer, target)
        except ReplicaError:
            registry.restore_aliases(customer, aliases)
            _restore(fleet, replicas, customer, current)
            raise
    finally:
        unload(fleet, replicas, staged)


def replicas_for(db: Database, customer: str, base_sha256: str) -> list[str]:
    """The replicas a customer's adapter goes to: its placement among the active replicas
    of its base, the other customers' placements taken as they are.

    Raises:
        InputError: no active replica serves the adapter's base.
    """
    replicas = {r.url: r.base_sha256 for r in db.replicas() if r.state == ACTIVE and r.base_sha256}
    if base_sha256 not in replicas.values():
        raise InputError(
            f"no replica in rotation serves adapter-{customer}'s base (sha256 "
            f"{base_sha256[:12]}); add one with `lora-ops fleet add URL`"
        )
    customers = {**db.placed_bases(), customer: base_sha256}
    k = get_settings().fleet_copies
    # A hot customer keeps the extra copies the fleet controller gave it.
    held = [url for url in db.placements().get(customer, []) if url in replicas]
    copies = {customer: len(held)} if len(held) > k else None
    return place(customers, replicas, k, copies=copies).replicas_of(customer)


def unload(fleet: Fleet, urls: Sequence[str], name: str) -> None:
    """Unload ``name`` from ``urls`` (best effort: a replica that cannot is logged)."""
    for url in urls:
        try:
            fleet.unload(url, name)
        except ReplicaError as exc:
            log.warning("could not unload %s from %s: %s", name, url, exc.reason)


def rollback(
    customer: str, *, registry: Registry | None = None, fleet: Fleet | None = None
) -> DeployOutcome:
    """Serve the ``previous`` version everywhere again (it and ``production`` swap)."""
    registry = registry or Registry()
    previous = registry.get_version_by_alias(customer, names.PREVIOUS)
    if previous is None:
        raise InputError(f"adapter-{customer} has no 'previous' version to roll back to")
    return deploy(
        customer, str(previous.version), triggered_by="rollback", registry=registry, fleet=fleet
    )


def _check_review(db: Database, customer: str, version: AdapterVersion) -> None:
    """Refuse a version a reviewer has not approved, for customers that require review."""
    record = customers.find(customer, db=db)
    if record is None or not record.require_review:
        return
    decision = review.decision_of(version.tags)
    if decision is True:
        return
    why = "was rejected in review" if decision is False else "needs a reviewer's approval"
    raise InputError(
        f"adapter-{customer} version {version.version} {why}: approve it in the MLflow UI "
        f"(version tag {APPROVED_TAG}=true) or with `lora-ops approve --customer {customer} "
        f"--version {version.version}`",
        field="version",
    )


def load_and_smoke(
    fleet: Fleet, url: str, customer: str, version: AdapterVersion, name: str | None = None
) -> None:
    """Load ``version`` on ``url`` (as ``name``, the customer's own by default); it must
    answer the smoke prompt as registration recorded."""
    name = name or customer
    _load(fleet, url, customer, version, name)
    expected = version.tags.get(SMOKE_OUTPUT_TAG)
    got = fleet.smoke(url, name)
    if expected is not None and got != expected:
        raise ReplicaError(url, f"smoke test answered {got!r}, registration recorded {expected!r}")


def _load(
    fleet: Fleet, url: str, customer: str, version: AdapterVersion, name: str | None = None
) -> None:
    fleet.load(
        url,
        name or customer,
        version_uri(customer, str(version.version)),
        version.tags.get(ADAPTER_SHA256_TAG),
    )


def _restore(
    fleet: Fleet, replicas: list[str], customer: str, current: AdapterVersion | None
) -> None:
    """Put every reachable replica back on what it served before (best effort, logged)."""
    for url in replicas:
        try:
            if current is None:
                if customer in fleet.models(url):
                    fleet.unload(url, customer)
            else:
                _load(fleet, url, customer, current)
        except ReplicaError as exc:
            log.error("could not restore %s on %s: %s", customer, url, exc.reason)
