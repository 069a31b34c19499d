"""Prefect deployments: ``retrain/<customer>`` on each customer's schedule, and the training
and review deployments beside them.

``sync_schedules`` makes Prefect match the customers table: one ``retrain/<customer>``
deployment per active customer (its cron schedule when it has one, its parameters from the
record), paused for customers that are inactive or gone. Deployments point at the flows by
module path (``flows.retrain.retrain``), so any worker with lora-ops installed runs them.
Submitting a run of one and following it is ``flows.runs``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron, Interval
from prefect.types.entrypoint import EntrypointType

from flows.retrain import RETRAIN_FLOW, retrain
from flows.review import REVIEW_SWEEP_FLOW, review_sweep
from flows.training import TRAIN_FLOW, train_adapter
from lora_ops import customers
from lora_ops.settings import Settings, get_settings

log = logging.getLogger(__name__)

TAGS = ["lora-ops"]
POOL_TYPE = "process"


@dataclass
class SyncReport:
    """What ``sync_schedules`` changed, by deployment name."""

    applied: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ScheduleRow:
    """One ``retrain/<customer>`` deployment as Prefect holds it."""

    customer: str
    deployment_id: UUID
    schedules: list[str]  # "0 3 * * * (Europe/Paris)"
    paused: bool
    next_runs: list[dt.datetime]


def ensure_work_pool(client: SyncPrefectClient, name: str) -> None:
    """Create the process work pool ``name`` unless it exists."""
    try:
        client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE))
        log.info("created Prefect work pool %s (%s)", name, POOL_TYPE)


def prepare_work_pool(name: str) -> None:
    """Make sure the process work pool ``name`` exists (a worker is about to poll it)."""
    with get_client(sync_client=True) as client:
        ensure_work_pool(client, name)


def sync_schedules(
    records: Iterable[customers.CustomerRecord], settings: Settings | None = None
) -> SyncReport:
    """Make Prefect's deployments match the customers table; returns what changed."""
    settings = settings or get_settings()
    report = SyncReport()
    wanted = {record.id: record for record in records if record.active}
    with get_client(sync_client=True) as client:
        ensure_work_pool(client, settings.work_pool)
        for record in wanted.values():
            _apply_retrain(client, record, settings.work_pool)
            report.applied.append(f"{RETRAIN_FLOW}/{record.id}")
        for deployment in _deployments_of(client, RETRAIN_FLOW):
            if deployment.name not in wanted and not deployment.paused:
                client.pause_deployment(deployment.id)
                report.paused.append(f"{RETRAIN_FLOW}/{deployment.name}")
        # Each sweep is a process on the worker: run it only while someone may be waiting.
        reviewed = any(record.require_review and record.auto_deploy for record in wanted.values())
        sweep = review_sweep.to_deployment(
            name=settings.work_pool,
            schedules=[Interval(settings.review_sweep_seconds)],
            paused=not reviewed,
            tags=TAGS,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        _apply(sweep, settings.work_pool)
        report.applied.append(f"{REVIEW_SWEEP_FLOW}/{settings.work_pool}")
        if settings.training_work_pool:
            ensure_work_pool(client, settings.training_work_pool)
            training = train_adapter.to_deployment(
                name=settings.training_work_pool,
                tags=[*TAGS, "training"],
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
            _apply(training, settings.training_work_pool)
            report.applied.append(f"{TRAIN_FLOW}/{settings.training_work_pool}")
    return report


def apply_customer(record: customers.CustomerRecord, settings: Settings | None = None) -> UUID:
    """Create or update ``retrain/<record.id>`` alone, as ``sync_schedules`` would."""
    settings = settings or get_settings()
    with get_client(sync_client=True) as client:
        ensure_work_pool(client, settings.work_pool)
        return _apply_retrain(client, record, settings.work_pool)


def _apply_retrain(
    client: SyncPrefectClient, record: customers.CustomerRecord, work_pool: str
) -> UUID:
    schedules = [Cron(record.schedule, timezone=record.timezone)] if record.schedule else []
    deployment = retrain.to_deployment(
        name=record.id,
        schedules=schedules,
        parameters=customers.retrain_parameters(record),
        description=f"Retrain {record.display_name}'s adapter from {record.data_uri}",
        tags=[*TAGS, f"customer:{record.id}"],
        paused=False,
        concurrency_limit=1,  # one retrain of a customer at a time; later ones wait their turn
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    deployment_id = _apply(deployment, work_pool)
    if not schedules:  # an update leaves the old schedules unless they are removed
        for schedule in client.read_deployment_schedules(deployment_id):
            client.delete_deployment_schedule(deployment_id, schedule.id)
    return deployment_id


def _apply(deployment: Any, work_pool: str) -> UUID:
    """Create or update a deployment (``to_deployment`` and ``apply`` are sync here)."""
    return cast(UUID, deployment.apply(work_pool_name=work_pool))


def _deployments_of(client: SyncPrefectClient, flow_name: str) -> list[Any]:
    return client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def list_schedules(next_runs: int = 3) -> list[ScheduleRow]:
    """Every ``retrain/<customer>`` deployment with its schedules and next scheduled runs."""
    rows = []
    with get_client(sync_client=True) as client:
        for deployment in sorted(_deployments_of(client, RETRAIN_FLOW), key=lambda d: d.name):
            upcoming = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                    )
                ),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=next_runs,
            )
            rows.append(
                ScheduleRow(
                    customer=deployment.name,
                    deployment_id=deployment.id,
                    schedules=[_describe(s.schedule) for s in deployment.schedules if s.active],
                    paused=bool(deployment.paused),
                    next_runs=[r.expected_start_time for r in upcoming if r.expected_start_time],
                )
            )
    return rows


def _describe(schedule: Any) -> str:
    cron = getattr(schedule, "cron", None)
    if cron is None:
        return str(schedule)
    return f"{cron} ({getattr(schedule, 'timezone', None) or 'UTC'})"
