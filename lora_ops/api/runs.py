"""What the fine-tuning API needs of the orchestrator, as a protocol.

A job is a series of runs of the customer's ``retrain/<customer>`` deployment (a pause
stops one, a resume starts the next). The library never imports Prefect, so the
implementation lives in ``flows.jobs`` and ``lora-ops api`` hands it to the app.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Protocol

from lora_ops.customers import CustomerRecord

# A run's state types as the orchestrator names them (Prefect's).
WAITING = {"SCHEDULED", "PENDING", "PAUSED"}
STOPPING = {"CANCELLING"}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass(frozen=True)
class RunState:
    """Where one run stands."""

    kind: str  # SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CRASHED, CANCELLING, ...
    name: str  # e.g. "Late", "Deployed", "No new data"
    message: str
    training_started: bool  # its train step (task or train-adapter subflow) has begun
    at: dt.datetime | None = None  # when it entered this state


@dataclass(frozen=True)
class RunEvent:
    """One thing that happened in a run: a state change or a log line."""

    source_id: str  # unique and stable: the state's or the log line's id
    at: dt.datetime
    level: str  # "info", "warn" or "error", as OpenAI's events name them
    message: str


class JobRuns(Protocol):
    """Runs of ``retrain/<customer>``: start, read, stop."""

    def ensure_deployment(self, record: CustomerRecord) -> None:
        """Make sure ``retrain/<record.id>`` exists as the record describes it."""

    def submit(self, customer: str, parameters: dict[str, Any], job_id: str) -> str:
        """Start a run with these parameters; its id."""

    def state(self, run_id: str) -> RunState:
        """The run's current state."""

    def stop(self, run_id: str) -> None:
        """Stop the run for real: a running one's process is ended; a waiting one never starts."""

    def events(self, run_id: str) -> list[RunEvent]:
        """The run's state changes and log lines (its subflows' too), oldest first."""
