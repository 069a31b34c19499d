"""Rows as OpenAI's objects: files, jobs, events, checkpoints, models, lists."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from lora_ops.db.models import FineTuningJob, UploadedFile


def unix(moment: dt.datetime | None) -> int | None:
    """Seconds since the epoch of a naive UTC time (as the database keeps them)."""
    if moment is None:
        return None
    return int(moment.replace(tzinfo=dt.UTC).timestamp())


def file_object(row: UploadedFile) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": unix(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",  # checked before it was stored: there is no other state
        "status_details": None,
        "expires_at": None,
        "sha256": row.sha256,
        "examples": row.examples,
    }


def job_object(row: FineTuningJob) -> dict[str, Any]:
    hyperparameters = json.loads(row.hyperparameters)
    error = json.loads(row.error) if row.error else None
    return {
        "id": row.id,
        "object": "fine_tuning.job",
        "created_at": unix(row.created_at),
        "error": error,
        "fine_tuned_model": row.fine_tuned_model,
        "finished_at": unix(row.finished_at),
        "hyperparameters": hyperparameters,
        "model": row.model,
        "organization_id": row.customer,
        "result_files": [],
        "seed": row.seed,
        "status": row.status,
        "trained_tokens": row.trained_tokens,
        "training_file": row.training_file,
        "validation_file": row.validation_file,
        "integrations": [],
        "metadata": json.loads(row.job_metadata) or None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "user_provided_suffix": row.suffix,
        "estimated_finish": None,
        "flow_run_ids": json.loads(row.flow_run_ids),  # lora-ops': the job's Prefect runs
    }


def model_object(customer: str, created: dt.datetime) -> dict[str, Any]:
    return {"id": customer, "object": "model", "created": unix(created), "owned_by": customer}


def page(items: Sequence[dict[str, Any]], limit: int) -> dict[str, Any]:
    """OpenAI's list: ``items`` holds up to ``limit + 1`` objects, the extra one meaning more."""
    shown = list(items[:limit])
    return {
        "object": "list",
        "data": shown,
        "has_more": len(items) > limit,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
    }


def after_cursor(items: Sequence[dict[str, Any]], after: str | None) -> list[dict[str, Any]]:
    """The items following the one with id ``after`` (all when None; none when unknown)."""
    if after is None:
        return list(items)
    ids = [item["id"] for item in items]
    return list(items[ids.index(after) + 1 :]) if after in ids else []
