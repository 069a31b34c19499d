"""Human review of adapter versions: the decision is a tag on the MLflow model version.

A reviewer approves a version in the MLflow UI (tag ``approved`` = ``true`` on the version
page) or with ``lora-ops approve``; ``approved`` = ``false`` rejects it. Keeping the decision
in the registry, beside the eval figures the reviewer reads, means there is one record of
who let which adapter reach production. A retrain flow that waits for a decision is paused
in Prefect under a pause key that names the version (``review/<customer>/<version>/<n>``),
so whatever resumes it can tell which decision it waits for.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from lora_ops import names
from lora_ops.errors import InputError
from lora_ops.registry.client import Registry
from lora_ops.registry.tags import APPROVED_TAG, REVIEW_TAG, REVIEWED_BY_TAG

log = logging.getLogger(__name__)

# The values of REVIEW_TAG.
PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"
_PAUSE_KEY = re.compile(r"review/(?P<customer>[a-z0-9][a-z0-9-]{0,62})/(?P<version>\d+)/\d+")


def decision_of(tags: Mapping[str, str]) -> bool | None:
    """True (approved), False (rejected) or None (no decision yet) from a version's tags."""
    value = tags.get(APPROVED_TAG)
    if value is None:
        return None
    answer = value.strip().lower()
    if answer in ("true", "false"):
        return answer == "true"
    log.warning("tag %s=%r is neither true nor false: treated as no decision", APPROVED_TAG, value)
    return None


def review_decision(customer: str, version: str, registry: Registry | None = None) -> bool | None:
    """The reviewer's decision on ``adapter-<customer>`` version ``version``, if any."""
    registry = registry or Registry()
    return decision_of(registry.get_version(customer, version).tags)


def request_review(customer: str, version: str, registry: Registry | None = None) -> None:
    """Mark the version as waiting for review (unless a decision is already there)."""
    registry = registry or Registry()
    if decision_of(registry.get_version(customer, version).tags) is None:
        registry.set_version_tags(customer, version, {REVIEW_TAG: PENDING})


def record_decision(
    customer: str,
    version: str,
    approved: bool,
    reviewer: str,
    registry: Registry | None = None,
) -> None:
    """Approve or reject a version, as a reviewer would in the MLflow UI.

    Raises:
        InputError: the customer id is invalid or the version does not exist.
    """
    names.check_customer(customer)
    if not version.isdigit():
        raise InputError(f"{version!r} is not a version number", field="version")
    registry = registry or Registry()
    if not registry.has_version(customer, version):
        raise InputError(f"adapter-{customer} has no version {version}", field="version")
    registry.set_version_tags(
        customer,
        version,
        {
            APPROVED_TAG: "true" if approved else "false",
            REVIEW_TAG: APPROVED if approved else REJECTED,
            REVIEWED_BY_TAG: reviewer,
        },
    )
    verdict = APPROVED if approved else REJECTED
    log.info("adapter-%s version %s %s by %s", customer, version, verdict, reviewer)


def pause_key(customer: str, version: str, attempt: int) -> str:
    """The Prefect pause key of a run waiting for this version's review (one per pause)."""
    return f"review/{names.check_customer(customer)}/{version}/{attempt}"


def parse_pause_key(key: str | None) -> tuple[str, str] | None:
    """(customer, version) from a pause key made by ``pause_key``; None for other pauses."""
    match = _PAUSE_KEY.fullmatch(key or "")
    return None if match is None else (match["customer"], match["version"])
