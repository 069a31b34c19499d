"""The fine-tuning API's jobs as Prefect flow runs of ``retrain/<customer>``
(:class:`lora_ops.api.runs.JobRuns`, implemented with Prefect's client)."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.objects import State
from prefect.client.schemas.sorting import LogSort
from prefect.states import Cancelled, Cancelling

from flows.runs import submit_retrain
from flows.schedules import apply_customer
from lora_ops.api.runs import FINAL, RunEvent, RunState
from lora_ops.customers import CustomerRecord

log = logging.getLogger(__name__)

TRAIN_STEPS = {"train"}  # the task that trains; the train-adapter subflow counts too
_LOG_PAGE = 200
_LEVELS = ((logging.ERROR, "error"), (logging.WARNING, "warn"))


class PrefectJobRuns:
    """Runs of ``retrain/<customer>`` through Prefect's API (``PREFECT_API_URL``)."""

    def ensure_deployment(self, record: CustomerRecord) -> None:
        apply_customer(record)

    def submit(self, customer: str, parameters: dict[str, Any], job_id: str) -> str:
        run = submit_retrain(customer, parameters)
        log.info("job %s: flow run %s of retrain/%s", job_id, run.id, customer)
        return str(run.id)

    def state(self, run_id: str) -> RunState:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(run_id))
            state = run.state
            kind = state.type.value if state is not None else "PENDING"
            started = kind not in {"SCHEDULED", "PENDING"} and _training_started(client, run.id)
            return RunState(
                kind=kind,
                name=state.name if state is not None and state.name else kind.title(),
                message=(state.message or "") if state is not None else "",
                training_started=started,
                at=state.timestamp if state is not None else None,
            )

    def stop(self, run_id: str) -> None:
        """Cancel the run: a running one goes to Cancelling, and the worker that runs it
        ends its process; one that never started is Cancelled at once."""
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(run_id))
            kind = run.state.type.value if run.state is not None else "PENDING"
            if kind in FINAL:
                return
            new: State[Any] = Cancelled() if kind in {"SCHEDULED", "PENDING"} else Cancelling()
            client.set_flow_run_state(run.id, new, force=True)

    def events(self, run_id: str) -> list[RunEvent]:
        with get_client(sync_client=True) as client:
            root = UUID(run_id)
            runs = [root, *_subflows(client, root)]
            events = [
                _state_event(state)
                for flow_run in runs
                for state in client.read_flow_run_states(flow_run)
            ]
            events += [_log_event(entry) for entry in _logs(client, runs)]
        return sorted(events, key=lambda e: e.at)


def _training_started(client: SyncPrefectClient, run_id: UUID) -> bool:
    if _subflows(client, run_id):
        return True
    tasks = client.read_task_runs(
        task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run_id]))
    )
    return any(
        task.task_key.split("-")[0] in TRAIN_STEPS or task.name.split("-")[0] in TRAIN_STEPS
        for task in tasks
    )


def _subflows(client: SyncPrefectClient, run_id: UUID) -> list[UUID]:
    parent = FlowRunFilterParentFlowRunId(any_=[run_id])
    return [
        run.id
        for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parent))
    ]


def _logs(client: SyncPrefectClient, run_ids: list[UUID]) -> list[Any]:
    entries: list[Any] = []
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids))
    while True:
        page = client.read_logs(
            log_filter=log_filter, sort=LogSort.TIMESTAMP_ASC, limit=_LOG_PAGE, offset=len(entries)
        )
        entries += page
        if len(page) < _LOG_PAGE:
            return entries


def _state_event(state: Any) -> RunEvent:
    text = f"Run {state.name or state.type.value.title()}"
    if state.message:
        text += f": {state.message}"
    level = "error" if state.type.value in {"FAILED", "CRASHED"} else "info"
    return RunEvent(f"state:{state.id}", _utc(state.timestamp), level, text)


def _log_event(entry: Any) -> RunEvent:
    level = next((name for floor, name in _LEVELS if entry.level >= floor), "info")
    return RunEvent(f"log:{entry.id}", _utc(entry.timestamp), level, entry.message)


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
