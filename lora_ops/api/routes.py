"""The routes: ``/v1/files``, ``/v1/fine_tuning/jobs`` (and their events and checkpoints),
``/v1/models``; every one behind a key.

Handlers are plain ``def``s where they call S3, MLflow or Prefect (blocking clients), so
FastAPI runs them in its thread pool.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile

from lora_ops.api import views
from lora_ops.api.files import Uploads
from lora_ops.api.jobs import ACTIVE, PAUSED, SUCCEEDED, Jobs, NotFound
from lora_ops.api.keys import Caller, caller_of
from lora_ops.api.progress import job_checkpoints, job_events
from lora_ops.api.runs import JobRuns
from lora_ops.api.schemas import JobCreate
from lora_ops.db.finetuning import FineTuningRecords
from lora_ops.errors import InputError
from lora_ops.registry import Registry
from lora_ops.storage import Storage

router = APIRouter(prefix="/v1")
UPLOAD_FIELDS = {"file", "purpose"}


@dataclass
class Services:
    """What the routes work with; one per app (``app.state.services``)."""

    records: FineTuningRecords
    uploads: Uploads
    jobs: Jobs
    runs: JobRuns
    registry: Registry
    storage: Storage
    bucket: str
    admin_token: str | None


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    return caller_of(authorization, services(request).admin_token, services(request).records)


Api = Annotated[Services, Depends(services)]
Who = Annotated[Caller, Depends(caller)]
After = Annotated[str | None, Query(max_length=64)]


def _refuse_unknown_query(request: Request, known: set[str]) -> None:
    for name in request.query_params:
        if name not in known and not (name.startswith("metadata[") and "metadata" in known):
            raise InputError(
                f"unknown query parameter; known: {', '.join(sorted(known))}", field=name
            )


# -- files -----------------------------------------------------------------------------------


@router.post("/files")
async def upload_file(request: Request, api: Api, who: Who) -> dict[str, Any]:
    form = await request.form()
    unknown = set(form) - UPLOAD_FIELDS
    if unknown:
        raise InputError(f"only {sorted(UPLOAD_FIELDS)} are read here", field=sorted(unknown)[0])
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile) or not upload.filename:
        raise InputError("send the file as a multipart file field named 'file'", field="file")
    if not isinstance(purpose, str):
        raise InputError("purpose is required ('fine-tune')", field="purpose")
    customer = who.customer
    if customer is None:
        raise InputError("files belong to a customer: upload with the customer's key", field="file")
    row = await run_in_threadpool(api.uploads.add, customer, upload.filename, purpose, upload.file)
    return views.file_object(row)


@router.get("/files")
def list_files(
    request: Request,
    api: Api,
    who: Who,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    purpose: Annotated[str | None, Query(max_length=32)] = None,
) -> dict[str, Any]:
    _refuse_unknown_query(request, {"after", "limit", "order", "purpose"})
    rows = api.records.files(who.customer, after, limit + 1, purpose, order == "desc")
    return views.page([views.file_object(row) for row in rows], limit)


def _file(api: Services, who: Caller, file_id: str) -> Any:
    row = api.records.file(file_id)
    if row is None or not who.may_see(row.customer):
        raise NotFound(f"no file {file_id!r}")
    return row


@router.get("/files/{file_id}")
def retrieve_file(file_id: str, api: Api, who: Who) -> dict[str, Any]:
    return views.file_object(_file(api, who, file_id))


@router.delete("/files/{file_id}")
def delete_file(file_id: str, api: Api, who: Who) -> dict[str, Any]:
    row = _file(api, who, file_id)
    busy = [
        job.id for job in api.records.jobs_using_file(file_id) if job.status in ACTIVE | {PAUSED}
    ]
    if busy:
        raise InputError(f"the file is in use by job(s) {', '.join(busy)}", field="file_id")
    api.uploads.delete(row)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/files/{file_id}/content")
def file_content(file_id: str, api: Api, who: Who) -> FileResponse:
    row = _file(api, who, file_id)
    folder = tempfile.mkdtemp(prefix="lora-ops-content-")
    path = api.uploads.content(row, Path(folder) / row.filename)
    cleanup = BackgroundTask(_remove_tree, folder)
    return FileResponse(path, filename=row.filename, background=cleanup)


def _remove_tree(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# -- jobs ------------------------------------------------------------------------------------


@router.post("/fine_tuning/jobs")
def create_job(body: JobCreate, api: Api, who: Who) -> dict[str, Any]:
    return views.job_object(api.jobs.create(who, body))


@router.get("/fine_tuning/jobs")
def list_jobs(
    request: Request,
    api: Api,
    who: Who,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    _refuse_unknown_query(request, {"after", "limit", "metadata"})
    wanted = {
        name[len("metadata[") : -1]: value
        for name, value in request.query_params.items()
        if name.startswith("metadata[") and name.endswith("]")
    }
    rows = api.jobs.list(who)
    shown = [views.job_object(row) for row in rows]
    shown = [
        job for job in shown if all((job["metadata"] or {}).get(k) == v for k, v in wanted.items())
    ]
    return views.page(views.after_cursor(shown, after), limit)


@router.get("/fine_tuning/jobs/{job_id}")
def retrieve_job(job_id: str, api: Api, who: Who) -> dict[str, Any]:
    return views.job_object(api.jobs.get(who, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, api: Api, who: Who) -> dict[str, Any]:
    return views.job_object(api.jobs.cancel(who, job_id))


@router.post("/fine_tuning/jobs/{job_id}/pause")
def pause_job(job_id: str, api: Api, who: Who) -> dict[str, Any]:
    return views.job_object(api.jobs.pause(who, job_id))


@router.post("/fine_tuning/jobs/{job_id}/resume")
def resume_job(job_id: str, api: Api, who: Who) -> dict[str, Any]:
    return views.job_object(api.jobs.resume(who, job_id))


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_events(
    request: Request,
    job_id: str,
    api: Api,
    who: Who,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    _refuse_unknown_query(request, {"after", "limit"})
    row = api.jobs.get(who, job_id)
    events = job_events(row, api.runs, api.registry)
    return views.page(views.after_cursor(events, after), limit)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(
    request: Request,
    job_id: str,
    api: Api,
    who: Who,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict[str, Any]:
    _refuse_unknown_query(request, {"after", "limit"})
    row = api.jobs.get(who, job_id)
    checkpoints = job_checkpoints(row, api.registry, api.storage, api.bucket)
    return views.page(views.after_cursor(checkpoints, after), limit)


# -- models ----------------------------------------------------------------------------------


def _fine_tuned(api: Services, who: Caller) -> dict[str, dict[str, Any]]:
    """The caller's fine-tuned models: one per customer with a job that succeeded."""
    models: dict[str, dict[str, Any]] = {}
    for row in reversed(api.records.jobs(who.customer)):  # oldest first: first success wins
        if row.status == SUCCEEDED and row.fine_tuned_model and row.fine_tuned_model not in models:
            models[row.fine_tuned_model] = views.model_object(
                row.fine_tuned_model, row.finished_at or row.created_at
            )
    return models


@router.get("/models")
def list_models(api: Api, who: Who) -> dict[str, Any]:
    return {"object": "list", "data": list(_fine_tuned(api, who).values())}


@router.get("/models/{model}")
def retrieve_model(model: str, api: Api, who: Who) -> dict[str, Any]:
    found = _fine_tuned(api, who).get(model)
    if found is None:
        raise NotFound(f"no model {model!r}")
    return found
