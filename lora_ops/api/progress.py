"""What a job did: its events (state changes, log lines, training metrics) and checkpoints,
in OpenAI's shapes, newest first.

Nothing is copied: events are read from the job's runs (the orchestrator's states and
logs) and its training run's metrics in MLflow; checkpoints from S3, where training writes
them (``checkpoints/<customer>/<run>/step-<n>/``). Ids are derived from their sources, so
they stay the same from one read to the next and page with ``after``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from typing import Any

from lora_ops import names
from lora_ops.api.jobs import CANCELLED, FAILED, SUCCEEDED
from lora_ops.api.runs import JobRuns
from lora_ops.api.views import unix
from lora_ops.db.models import FineTuningJob
from lora_ops.registry import Registry
from lora_ops.storage import Storage

_FINISHED_CHECKPOINT = re.compile(r"/step-(\d+)/MANIFEST\.json$")  # written last
_ENDINGS = {
    SUCCEEDED: ("info", "The job has successfully completed"),
    FAILED: ("error", "The job failed"),
    CANCELLED: ("info", "The job was cancelled"),
}


def _seconds(moment: dt.datetime) -> float:
    """A naive UTC time (as the database keeps them) in seconds, to the microsecond."""
    return moment.replace(tzinfo=dt.UTC).timestamp()


def _id(prefix: str, source: str) -> str:
    return prefix + hashlib.sha256(source.encode()).hexdigest()[:24]


def _event(
    source: str, at: float, level: str, message: str, kind: str = "message", data: Any = None
) -> dict[str, Any]:
    return {
        "id": _id("ftevent-", source),
        "object": "fine_tuning.job.event",
        "created_at": int(at),
        "level": level,
        "message": message,
        "type": kind,
        "data": data or {},
        "_at": at,  # sort key, dropped before sending
    }


def job_events(row: FineTuningJob, runs: JobRuns, registry: Registry) -> list[dict[str, Any]]:
    """Every event of the job, newest first."""
    created = _seconds(row.created_at)
    events = [_event(f"{row.id}:created", created, "info", f"Created fine-tuning job: {row.id}")]
    for run_id in json.loads(row.flow_run_ids):
        for happened in runs.events(run_id):
            at = happened.at.replace(tzinfo=happened.at.tzinfo or dt.UTC).timestamp()
            events.append(_event(happened.source_id, at, happened.level, happened.message))
    events += _metric_events(row, registry)
    if row.status in _ENDINGS and row.finished_at is not None:
        level, message = _ENDINGS[row.status]
        if row.error:
            message += ": " + json.loads(row.error)["message"]
        ending = _event(f"{row.id}:{row.status}", _seconds(row.finished_at), level, message)
        # The run's last log lines may be stamped after the state it ended in: the job's end
        # is its last event all the same.
        ending["_at"] = max([ending["_at"], *(event["_at"] for event in events)]) + 1e-3
        events.append(ending)
    events.sort(key=lambda e: (e["_at"], e["id"]), reverse=True)
    for event in events:
        del event["_at"]
    return events


def _metric_events(row: FineTuningJob, registry: Registry) -> list[dict[str, Any]]:
    run = registry.find_run(row.customer, row.run_key)
    if run is None:
        return []
    events = []
    for key, label in (("train_loss", "training loss"), ("val_loss", "validation loss")):
        for step, value, timestamp_ms in registry.metric_points(run.run_id, key):
            events.append(
                _event(
                    f"{run.run_id}:{key}:{step}",
                    timestamp_ms / 1000,
                    "info",
                    f"Step {step}: {label}={value:.4f}",
                    "metrics",
                    {"step": step, key: value},
                )
            )
    return events


def job_checkpoints(
    row: FineTuningJob, registry: Registry, storage: Storage, bucket: str
) -> list[dict[str, Any]]:
    """The training run's checkpoints in S3 with their step and losses, newest first."""
    run = registry.find_run(row.customer, row.run_key)
    if run is None:
        return []
    prefix = names.s3_uri(bucket, names.checkpoint_prefix(row.customer, run.run_id))
    steps = sorted(
        {
            int(m.group(1))
            for key in storage.list_keys(prefix)
            if (m := _FINISHED_CHECKPOINT.search(key))
        },
        reverse=True,
    )
    train = {
        step: (value, ms) for step, value, ms in registry.metric_points(run.run_id, "train_loss")
    }
    valid = registry.metric_points(run.run_id, "val_loss")
    checkpoints = []
    for step in steps:
        loss, ms = train.get(step, (None, None))
        metrics: dict[str, Any] = {"step": step, "train_loss": loss}
        seen = [value for at, value, _ in valid if at <= step]
        if seen:
            metrics["valid_loss"] = seen[-1]
        checkpoints.append(
            {
                "id": _id("ftckpt-", f"{run.run_id}:{step}"),
                "object": "fine_tuning.job.checkpoint",
                "created_at": int(ms / 1000) if ms is not None else unix(row.created_at),
                "fine_tuned_model_checkpoint": f"{prefix}step-{step}/",
                "fine_tuning_job_id": row.id,
                "metrics": metrics,
                "step_number": step,
            }
        )
    return checkpoints
