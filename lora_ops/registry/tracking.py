"""Training runs in MLflow: start, log, finish, and find one again by its idempotency key.

A customer's runs live in experiment ``lora-ops/<customer>`` (DESIGN.md). The key that
names one (base weights, dataset, training config) combination is computed here, and a
run tagged with it is how a retrain finds (and resumes or reuses) the training it did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from pydantic import BaseModel

from lora_ops import names
from lora_ops.config import TrainConfig
from lora_ops.errors import InputError
from lora_ops.registry.connection import Connection
from lora_ops.registry.tags import CUSTOMER_TAG, IDEMPOTENCY_KEY_TAG

log = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Config fields that cannot change the trained weights, so they stay out of the key.
_NOT_IN_KEY = frozenset({"checkpoint_every", "gradient_checkpointing"})
# Fields added after keys were first recorded: left out while at their default, so a
# customer's unchanged data and settings keep their key (and are not retrained) on upgrade.
_IN_KEY_WHEN_SET = {
    "eval_every": None,
    "early_stopping_patience": None,
    "warm_start": None,
    "packing": False,
    "base_dtype": "auto",
    "quantize": None,
}


def idempotency_key(base_sha256: str, dataset_sha256: str, config: TrainConfig) -> str:
    """The sha256 that names one (base weights, dataset, training config) combination.

    Canonical JSON (sorted keys, no spaces) of the three; ``target_modules`` is sorted, as
    its order cannot change the adapter, and ``checkpoint_every`` and
    ``gradient_checkpointing`` (neither changes the weights) are left out.

    Raises:
        InputError: a hash is not a sha256 hex digest.
    """
    for field, value in (("base_sha256", base_sha256), ("dataset_sha256", dataset_sha256)):
        if not names.SHA256.fullmatch(value):
            raise InputError(f"{value!r} is not a sha256 hex digest", field=field)
    dumped = {
        k: v
        for k, v in config.model_dump(mode="json").items()
        if k not in _NOT_IN_KEY and (k not in _IN_KEY_WHEN_SET or v != _IN_KEY_WHEN_SET[k])
    }
    dumped["lora"]["target_modules"] = sorted(dumped["lora"]["target_modules"])
    record = {"base_sha256": base_sha256, "config": dumped, "dataset_sha256": dataset_sha256}
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"lora": {"r": 8}}`` -> ``{"lora.r": "8"}``; values as MLflow-sized strings.

    Lists and tuples become JSON; pydantic models and dataclasses are flattened like dicts.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = json.dumps(list(value)) if isinstance(value, list | tuple) else str(value)
        flat[name] = text[:MAX_PARAM_VAL_LENGTH]
    return flat


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """One tracked training run: its id, status and tags."""

    run_id: str
    status: str
    tags: Mapping[str, str]

    @classmethod
    def of(cls, run: Run) -> TrainingRun:
        return cls(str(run.info.run_id), str(run.info.status), dict(run.data.tags))


class TrainingRuns(Connection):
    """Every customer's training runs in one MLflow installation; built as a Connection is."""

    def experiment_id(self, customer: str) -> str:
        """The id of experiment ``lora-ops/<customer>``, created (or restored) if needed."""
        name = names.experiment_name(customer)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = f"{self.artifact_root}/{customer}" if self.artifact_root else None
            try:
                return self.client.create_experiment(
                    name, artifact_location=location, tags={CUSTOMER_TAG: customer}
                )
            except MlflowException as exc:  # created meanwhile by another process
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)
                assert experiment is not None
        if experiment.lifecycle_stage == "deleted":
            log.warning("experiment %s was deleted; restoring it", name)
            self.client.restore_experiment(experiment.experiment_id)
        return str(experiment.experiment_id)

    def start_run(
        self, customer: str, run_name: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str:
        """Start a run in ``lora-ops/<customer>`` and return its id (status RUNNING)."""
        run_tags = {**(tags or {}), CUSTOMER_TAG: customer}
        run = self.client.create_run(self.experiment_id(customer), run_name=run_name, tags=run_tags)
        log.info("MLflow run %s started: %s", run.info.run_id, self.run_url(run.info.run_id))
        return str(run.info.run_id)

    @contextmanager
    def run(
        self, customer: str, run_name: str | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[str]:
        """``with registry.run("acme") as run_id:`` ends the run FINISHED, or FAILED on error."""
        run_id = self.start_run(customer, run_name, tags)
        try:
            yield run_id
        except BaseException:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run FINISHED, FAILED or KILLED."""
        if status not in RUN_STATUSES:
            raise InputError(f"{status!r} is not one of {RUN_STATUSES}", field="status")
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log (nested) params, flattened to dotted keys (``lora.r``); see flatten_params."""
        items = [Param(key, value) for key, value in flatten_params(params).items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        """Log metric values at ``step`` (0 when not given), in one batch."""
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
        """Upload a local folder's files under ``artifact_path`` of the run."""
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_dict(self, run_id: str, data: Mapping[str, Any], artifact_file: str) -> None:
        """Save a dict as a JSON (or ``.yaml``) file among the run's artifacts."""
        self.client.log_dict(run_id, dict(data), artifact_file)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """Save a matplotlib figure (``loss.png``) among the run's artifacts."""
        self.client.log_figure(run_id, figure, artifact_file)

    def log_table(self, run_id: str, data: Any, artifact_file: str) -> None:
        """Save a table (a dict of columns or a DataFrame) as ``artifact_file`` (``.json``)."""
        self.client.log_table(run_id, data, artifact_file)

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI."""
        experiment_id = self.client.get_run(run_id).info.experiment_id
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def log_artifact(self, run_id: str, local_file: Path, artifact_path: str | None = None) -> None:
        """Upload one local file under ``artifact_path`` of the run."""
        self.client.log_artifact(run_id, str(local_file), artifact_path)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def metric_history(self, run_id: str, key: str) -> list[float]:
        """A metric's values in step order (the last value logged at each step)."""
        by_step = {m.step: m.value for m in self.client.get_metric_history(run_id, key)}
        return [by_step[step] for step in sorted(by_step)]

    def metric_points(self, run_id: str, key: str) -> list[tuple[int, float, int]]:
        """A metric's (step, value, timestamp in ms) in step order, the last logged at each step."""
        by_step = {
            m.step: (m.step, m.value, m.timestamp)
            for m in self.client.get_metric_history(run_id, key)
        }
        return [by_step[step] for step in sorted(by_step)]

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        """Each metric's last value."""
        return dict(self.client.get_run(run_id).data.metrics)

    def find_run(self, customer: str, key: str) -> TrainingRun | None:
        """The newest run of ``customer`` tagged with idempotency key ``key``, if any."""
        if not names.SHA256.fullmatch(key):
            raise InputError(f"{key!r} is not a sha256 hex digest", field="key")
        runs = self.client.search_runs(
            [self.experiment_id(customer)],
            filter_string=f"tags.{IDEMPOTENCY_KEY_TAG} = '{key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return TrainingRun.of(runs[0]) if runs else None

    def download_run_artifacts(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        """Download ``artifact_path`` of a run into ``dst``; returns the local path."""
        dst.mkdir(parents=True, exist_ok=True)
        with self._artifact_errors_explained(f"{artifact_path} of run {run_id}"):
            return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))
