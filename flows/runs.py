"""Runs of ``retrain/<customer>`` through Prefect's API: submit one, then follow its state
changes and log lines (its train-adapter subflow's too) until it ends."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTimestamp,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import LogSort
from prefect.exceptions import ObjectNotFound

from flows.retrain import RETRAIN_FLOW
from flows.schedules import TAGS
from lora_ops import names
from lora_ops.errors import InputError


def submit_retrain(customer: str, parameters: dict[str, Any] | None = None) -> FlowRun:
    """Create a run of ``retrain/<customer>``; ``parameters`` override the deployment's."""
    names.check_customer(customer)
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(f"{RETRAIN_FLOW}/{customer}")
        except ObjectNotFound:
            raise InputError(
                f"Prefect has no deployment {RETRAIN_FLOW}/{customer}: add the customer "
                "(`lora-ops customers add`) and run `lora-ops schedule sync`",
                field="customer",
            ) from None
        return client.create_flow_run_from_deployment(
            deployment.id, parameters=parameters or {}, tags=[*TAGS, "remote"]
        )


def follow_flow_run(
    flow_run_id: UUID, on_line: Callable[[str], None], poll_s: float = 2.0
) -> FlowRun:
    """Report a run's state changes and log lines until it reaches a final state."""
    last_state = None
    since: dt.datetime | None = None
    task_names: dict[UUID, str] = {}
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            runs = [flow_run_id, *_subflow_runs(client, flow_run_id)]  # train-adapter's steps
            for entry in _new_logs(client, runs, since):
                since = entry.timestamp
                if entry.task_run_id is None:
                    on_line(f"  {entry.message}")
                    continue
                if entry.task_run_id not in task_names:
                    task_names[entry.task_run_id] = client.read_task_run(entry.task_run_id).name
                on_line(f"  {task_names[entry.task_run_id]}: {entry.message}")
            state = run.state
            if state is not None and (state.name, state.message) != last_state:
                last_state = (state.name, state.message)
                on_line(f"{state.name}" + (f": {state.message}" if state.message else ""))
            if state is not None and state.is_final():
                return run
            time.sleep(poll_s)


def _subflow_runs(client: SyncPrefectClient, flow_run_id: UUID) -> list[UUID]:
    parent = FlowRunFilterParentFlowRunId(any_=[flow_run_id])
    children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parent))
    return [child.id for child in children]


def _new_logs(
    client: SyncPrefectClient, flow_run_ids: list[UUID], since: dt.datetime | None
) -> list[Any]:
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids))
    if since is not None:
        log_filter.timestamp = LogFilterTimestamp(after_=since + dt.timedelta(microseconds=1))
    return client.read_logs(log_filter=log_filter, sort=LogSort.TIMESTAMP_ASC, limit=200)
