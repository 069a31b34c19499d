"""The deploy and rollback flows: one version onto the whole fleet, all or nothing."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, task

from lora_ops import names
from lora_ops.fleet import rollout


@task(name="deploy-to-fleet")
def deploy_to_fleet(
    customer: str, version: str | None, alias: str, triggered_by: str
) -> dict[str, Any]:
    """Load, smoke-test and promote; any replica failing puts every replica back."""
    return asdict(rollout.deploy(customer, version, alias, triggered_by=triggered_by))


@task(name="rollback-fleet")
def rollback_fleet(customer: str) -> dict[str, Any]:
    """Serve the previous production version everywhere again."""
    return asdict(rollout.rollback(customer))


@flow(name="deploy")
def deploy_adapter(
    customer: str,
    version: str | None = None,
    alias: str = names.CANDIDATE,
    triggered_by: str = "cli",
) -> dict[str, Any]:
    """Promote one adapter version to production on every serving replica."""
    names.check_customer(customer)
    return deploy_to_fleet(customer, version, alias, triggered_by)


@flow(name="rollback")
def rollback_adapter(customer: str) -> dict[str, Any]:
    """Put the previous production version back on every serving replica."""
    names.check_customer(customer)
    return rollback_fleet(customer)
