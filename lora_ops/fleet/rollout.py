"""Promoting an adapter version to the whole fleet, all or nothing.

Every replica loads the version and answers the smoke prompt as recorded at registration;
only then does alias ``production`` move (the old one becomes ``previous``). If any
replica fails at any step, every replica goes back to what it served before and the
aliases stay as they were. Deploys of one customer never overlap (a database lock).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from lora_ops import customers, names
from lora_ops.db import Database
from lora_ops.errors import InputError, LoraOpsError
from lora_ops.fleet.client import Fleet, ReplicaError
from lora_ops.registry import AdapterVersion, Registry, review
from lora_ops.registry.tags import ADAPTER_SHA256_TAG, APPROVED_TAG, SMOKE_OUTPUT_TAG

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
    """Serve ``version`` (or the one under ``alias``) on every replica, then promote it."""
    names.check_customer(customer)
    registry = registry or Registry()
    fleet = fleet or Fleet()
    target = resolve_version(registry, customer, version, alias)
    if triggered_by != "rollback":  # going back to what served before needs no new review
        _check_review(fleet.db, customer, target)
    current = registry.get_version_by_alias(customer, names.PRODUCTION)
    replicas = fleet.urls()
    if not replicas:
        raise InputError("the fleet has no replicas; add one with `lora-ops fleet add URL`")
    holder = f"{socket.gethostname()}:{os.getpid()}:{triggered_by}"
    with fleet.db.deploy_lock(customer, holder):
        rows = fleet.db.record_deployment_start(
            customer, str(target.version), replicas, triggered_by
        )
        try:
            for url in replicas:
                _load_and_smoke(fleet, url, customer, target)
        except ReplicaError as exc:
            _restore(fleet, replicas, customer, current)
            fleet.db.record_deployment_end(rows, "failed", str(exc))
            raise DeployFailed(
                f"deploy of adapter-{customer} version {target.version} failed "
                f"and was rolled back: {exc}"
            ) from None
        registry.promote_to_production(customer, str(target.version))
        fleet.db.record_deployment_end(rows, "succeeded", "")
    previous = None if current is None else str(current.version)
    log.info("adapter-%s version %s serves on %d replicas", customer, target.version, len(replicas))
    return DeployOutcome(customer, str(target.version), previous, replicas)


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


def _load_and_smoke(fleet: Fleet, url: str, customer: str, version: AdapterVersion) -> None:
    fleet.load(
        url,
        customer,
        version_uri(customer, str(version.version)),
        version.tags.get(ADAPTER_SHA256_TAG),
    )
    expected = version.tags.get(SMOKE_OUTPUT_TAG)
    got = fleet.smoke(url, customer)
    if expected is not None and got != expected:
        raise ReplicaError(url, f"smoke test answered {got!r}, registration recorded {expected!r}")


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
                fleet.load(
                    url,
                    customer,
                    version_uri(customer, str(current.version)),
                    current.tags.get(ADAPTER_SHA256_TAG),
                )
        except ReplicaError as exc:
            log.error("could not restore %s on %s: %s", customer, url, exc.reason)
