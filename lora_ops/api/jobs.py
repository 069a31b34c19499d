"""Fine-tuning jobs: each one a series of runs of ``retrain/<customer>``, in OpenAI's statuses.

Created: the files are the caller's, the hyperparameters become a TrainConfig, the
customer gets a record (and its deployment) if it had none, and a run starts with the
job's data, base and config. Its status is read from the current run when asked (and by
the app's refresher): ``queued`` while it waits, ``validating_files`` while its data is
checked and prepared, ``running`` once training began, then ``succeeded`` (the version
registered under the job's idempotency key; ``fine_tuned_model`` is the customer's model
id), ``failed`` (the gate's figures or the run's error) or ``cancelled``. Pause stops the
run for real and resume starts a new one, which finds the training run by its key and
goes on from its newest checkpoint in S3.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from lora_ops import customers, names, pipeline
from lora_ops.api.hyperparameters import train_config
from lora_ops.api.keys import Caller
from lora_ops.api.runs import FINAL, WAITING, JobRuns, RunState
from lora_ops.api.schemas import JobCreate
from lora_ops.base_models import CATALOGUE
from lora_ops.config import TrainConfig
from lora_ops.db.finetuning import FineTuningRecords
from lora_ops.db.models import FineTuningJob, UploadedFile, utcnow
from lora_ops.errors import InputError, LoraOpsError
from lora_ops.registry import Registry
from lora_ops.registry.tags import GATE_FAILED, GATE_REASON_TAG, GATE_TAG

log = logging.getLogger(__name__)

QUEUED, VALIDATING, RUNNING = "queued", "validating_files", "running"
SUCCEEDED, FAILED, CANCELLED, PAUSED = "succeeded", "failed", "cancelled", "paused"
ENDED = {SUCCEEDED, FAILED, CANCELLED}
ACTIVE = {QUEUED, VALIDATING, RUNNING}
# What the evaluate step logs for the gate (pipeline._log_evaluation): a failed job's figures.
GATE_FIGURES = ("base_eval_loss", "eval_loss", "production_eval_loss", "improvement_over_base")


class NotFound(LoraOpsError):
    """No such object, or one the caller may not see (HTTP 404 either way)."""


class WrongState(InputError):
    """The job cannot do that in its status (e.g. resume a running job)."""


@dataclass(frozen=True)
class Outcome:
    """How a job's current run ended, as the job records it."""

    status: str
    fine_tuned_model: str | None = None
    error: dict[str, Any] | None = None


class Jobs:
    """Create, read and steer fine-tuning jobs."""

    def __init__(self, records: FineTuningRecords, runs: JobRuns, registry: Registry) -> None:
        self.records, self.runs, self.registry = records, runs, registry

    # -- create ----------------------------------------------------------------------------

    def create(self, caller: Caller, request: JobCreate) -> FineTuningJob:
        """Check the request, start the first run and record the job.

        Raises:
            InputError: a field is refused; ``field`` names it.
        """
        customer = self._customer(caller, request.suffix)
        if request.model not in CATALOGUE:
            raise InputError(
                f"{request.model!r} is not a base model here; bases: {', '.join(CATALOGUE)}",
                field="model",
            )
        record = customers.find(customer)
        if record is not None and not record.active:
            raise InputError(f"customer {customer} is inactive", field="suffix")
        base_config = record.spec.train_config() if record is not None else TrainConfig()
        hyperparameters, where = request.hyperparameters_given()
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        config, resolved = train_config(hyperparameters, base_config, seed, where)
        training = self._own_file(customer, request.training_file, "training_file")
        validation = None
        if request.validation_file is not None:
            validation = self._own_file(customer, request.validation_file, "validation_file")
        if record is None:
            record = customers.add(_new_customer(customer, training, validation, request.model))
            log.info("customer %s added by the fine-tuning API", customer)
        self.runs.ensure_deployment(record)
        parameters = customers.retrain_parameters(record.spec) | {
            "data_uri": training.uri,
            "validation_data_uri": validation.uri if validation is not None else None,
            "base": request.model,
            "config": config.model_dump(mode="json"),
        }
        _, key = pipeline.data_fingerprint(
            customer, training.uri, request.model, config, parameters["validation_data_uri"]
        )
        job_id = "ftjob-" + secrets.token_hex(12)
        created = utcnow()  # before its first run is: the job's events start with it
        run_id = self.runs.submit(customer, parameters, job_id)
        row = FineTuningJob(
            id=job_id,
            customer=customer,
            model=request.model,
            training_file=training.id,
            validation_file=validation.id if validation is not None else None,
            suffix=request.suffix,
            seed=seed,
            hyperparameters=json.dumps(resolved),
            parameters=json.dumps(parameters),
            job_metadata=json.dumps(request.metadata or {}),
            run_key=key,
            status=QUEUED,
            flow_run_ids=json.dumps([run_id]),
            created_at=created,
        )
        try:
            return self.records.add_job(row)
        except Exception:
            self.runs.stop(run_id)  # no run without its job
            raise

    def _customer(self, caller: Caller, suffix: str | None) -> str:
        if caller.customer is not None:
            if suffix is not None and suffix != caller.customer:
                raise InputError(
                    f"your key belongs to customer {caller.customer}: suffix must be "
                    f"{caller.customer!r} or left out",
                    field="suffix",
                )
            return caller.customer
        if suffix is None:
            raise InputError("the admin key must name the customer in suffix", field="suffix")
        try:
            return names.check_customer(suffix)
        except InputError as exc:
            raise InputError(exc.reason, field="suffix") from None

    def _own_file(self, customer: str, file_id: str, field: str) -> UploadedFile:
        row = self.records.file(file_id)
        if row is None or row.customer != customer:
            raise InputError(f"no file {file_id!r} of customer {customer}", field=field)
        return row

    # -- read ------------------------------------------------------------------------------

    def get(self, caller: Caller, job_id: str) -> FineTuningJob:
        """The job, its status brought up to date.

        Raises:
            NotFound: no such job, or another customer's.
        """
        row = self.records.job(job_id)
        if row is None or not caller.may_see(row.customer):
            raise NotFound(f"no fine-tuning job {job_id!r}")
        return self.refresh(row)

    def list(self, caller: Caller) -> list[FineTuningJob]:
        """Every job the caller may see, newest first, statuses brought up to date."""
        return [self.refresh(row) for row in self.records.jobs(caller.customer)]

    def refresh(self, row: FineTuningJob) -> FineTuningJob:
        """Bring a job's status up to date with its current run."""
        if row.status in ENDED or row.status == PAUSED:
            return row
        state = self.runs.state(current_run(row))
        values: dict[str, Any] = {"status": _status_while(state)}
        if state.kind in FINAL:
            outcome = self._outcome(row, state)
            values = {
                "status": outcome.status,
                "fine_tuned_model": outcome.fine_tuned_model,
                "error": json.dumps(outcome.error) if outcome.error else None,
                "finished_at": state.at or utcnow(),
            }
        if all(getattr(row, name) == value for name, value in values.items()):
            return row
        return self.records.update_job(row.id, values)

    def _outcome(self, row: FineTuningJob, state: RunState) -> Outcome:
        if state.kind == "CANCELLED":
            return Outcome(CANCELLED)
        if state.kind == "COMPLETED":
            if state.name == "Rejected":
                error = {"code": "review_rejected", "message": state.message, "param": None}
                return Outcome(FAILED, error=error)
            if self.registry.find_version(row.customer, row.run_key) is not None:
                return Outcome(SUCCEEDED, fine_tuned_model=row.customer)
            message = f"the run completed ({state.message}) but registered no version"
            return Outcome(
                FAILED, error={"code": "not_registered", "message": message, "param": None}
            )
        return Outcome(FAILED, error=self._failure(row, state))

    def _failure(self, row: FineTuningJob, state: RunState) -> dict[str, Any]:
        run = self.registry.find_run(row.customer, row.run_key)
        if run is not None and run.tags.get(GATE_TAG) == GATE_FAILED:
            logged = self.registry.latest_metrics(run.run_id)
            figures = {name: logged[name] for name in GATE_FIGURES if name in logged}
            shown = ", ".join(f"{name} {value:.4f}" for name, value in figures.items())
            reason = run.tags.get(GATE_REASON_TAG, "")
            message = f"the evaluation gate refused the adapter: {reason} ({shown})"
            return {"code": "gate_failed", "message": message, "param": None, "figures": figures}
        message = state.message or f"the run ended {state.name}"
        return {"code": "training_failed", "message": message, "param": None}

    # -- steer -----------------------------------------------------------------------------

    def cancel(self, caller: Caller, job_id: str) -> FineTuningJob:
        row = self.get(caller, job_id)
        if row.status in ENDED:
            raise WrongState(f"the job has already {row.status}", field="job_id")
        if row.status != PAUSED:
            self.runs.stop(current_run(row))
        return self.records.update_job(row.id, {"status": CANCELLED, "finished_at": utcnow()})

    def pause(self, caller: Caller, job_id: str) -> FineTuningJob:
        row = self.get(caller, job_id)
        if row.status not in ACTIVE:
            raise WrongState(
                f"only a queued or running job can be paused; it is {row.status}", field="job_id"
            )
        self.runs.stop(current_run(row))
        return self.records.update_job(row.id, {"status": PAUSED})

    def resume(self, caller: Caller, job_id: str) -> FineTuningJob:
        row = self.get(caller, job_id)
        if row.status != PAUSED:
            raise WrongState(
                f"only a paused job can be resumed; it is {row.status}", field="job_id"
            )
        run_id = self.runs.submit(row.customer, json.loads(row.parameters), row.id)
        runs = [*json.loads(row.flow_run_ids), run_id]
        return self.records.update_job(row.id, {"status": QUEUED, "flow_run_ids": json.dumps(runs)})


def current_run(row: FineTuningJob) -> str:
    return str(json.loads(row.flow_run_ids)[-1])


def _status_while(state: RunState) -> str:
    if state.kind in WAITING:
        return QUEUED
    return RUNNING if state.training_started else VALIDATING


def _new_customer(
    customer: str, training: UploadedFile, validation: UploadedFile | None, model: str
) -> customers.CustomerSpec:
    # A customer made through the API is served at once: fine-tuning's users expect the
    # model id a job returns to answer.
    return customers.CustomerSpec.checked(
        {
            "id": customer,
            "data_uri": training.uri,
            "validation_data_uri": validation.uri if validation is not None else None,
            "base_model": model,
            "auto_deploy": True,
        }
    )
