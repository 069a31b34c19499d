"""Waiting for a reviewer: retrain pauses in Prefect; a decision in MLflow resumes it."""

from __future__ import annotations

import time
from uuid import UUID

from prefect import flow, get_run_logger, pause_flow_run
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import NotPausedError
from prefect.flow_runs import resume_flow_run

from lora_ops.registry import review
from lora_ops.registry.tags import APPROVED_TAG
from lora_ops.settings import get_settings

REVIEW_SWEEP_FLOW = "review-sweep"


def await_review(customer: str, version: str, timeout_s: float) -> bool:
    """Pause this flow run until a reviewer decides on the version; True when approved.

    The run is paused with Prefect's ``pause_flow_run`` (its state in the UI is Paused) and
    is resumed by the ``review-sweep`` flow or ``lora-ops approve`` once the version's
    ``approved`` tag is set. A run resumed by hand with no decision yet pauses again.

    Raises:
        prefect.exceptions.FlowPauseTimeout: nobody decided within ``timeout_s``.
    """
    logger = get_run_logger()
    review.request_review(customer, version)
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while (decision := review.review_decision(customer, version)) is None:
        attempt += 1
        remaining = max(1, int(deadline - time.monotonic()))
        logger.info(
            "adapter-%s version %s waits for review: set its tag %s=true (or false) in "
            "MLflow, or run `lora-ops approve --customer %s --version %s`",
            customer,
            version,
            APPROVED_TAG,
            customer,
            version,
        )
        pause_flow_run(
            timeout=remaining,
            poll_interval=get_settings().review_poll_seconds,
            key=review.pause_key(customer, version, attempt),
        )
    logger.info(
        "adapter-%s version %s was %s", customer, version, "approved" if decision else "rejected"
    )
    return decision


def resume_decided_runs(customer: str | None = None, version: str | None = None) -> list[UUID]:
    """Resume the paused retrain runs whose version now has a decision; returns their ids."""
    state_filter = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
    with get_client(sync_client=True) as client:
        paused = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])),
            flow_run_filter=FlowRunFilter(state=state_filter),
        )
    resumed = []
    for run in paused:
        key = run.state.state_details.pause_key if run.state else None
        waiting = review.parse_pause_key(key)
        if waiting is None or not _wanted(waiting, customer, version):
            continue
        if review.review_decision(*waiting) is None:
            continue
        try:
            resume_flow_run(run.id)
        except NotPausedError:  # resumed meanwhile by someone else
            continue
        resumed.append(run.id)
    return resumed


def _wanted(waiting: tuple[str, str], customer: str | None, version: str | None) -> bool:
    return customer in (None, waiting[0]) and version in (None, waiting[1])


@flow(name=REVIEW_SWEEP_FLOW)
def review_sweep() -> list[str]:
    """Resume retrain runs waiting for review whose version has a decision in MLflow."""
    resumed = resume_decided_runs()
    if resumed:
        get_run_logger().info("resumed %d reviewed run(s): %s", len(resumed), resumed)
    return [str(run_id) for run_id in resumed]
