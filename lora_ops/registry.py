"""MLflow: runs, registered adapter versions, aliases, tags, and the idempotency key.

The one module that talks to MLflow. Every call goes through an explicit
``MlflowClient(tracking_uri, registry_uri)``: nothing here reads or sets MLflow's global
tracking URI or active run, so two registries (or two Prefect tasks in threads) never
meet. Names follow DESIGN.md: experiment ``lora-ops/<customer>``, registered model
``adapter-<customer>``, aliases ``candidate`` / ``production`` / ``previous``.

Each adapter version is an MLflow *pyfunc* model (:mod:`lora_ops.adapter_pyfunc`): the
PEFT folder sits at the version tag ``adapter_path`` inside it, and
``mlflow.pyfunc.load_model("models:/adapter-<customer>@production")`` answers prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import mlflow
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric, Param, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from pydantic import BaseModel

from lora_ops import names
from lora_ops.adapter_pyfunc import (
    adapter_path_in,
    check_adapter_dir,
    peft_folder_in,
    save_pyfunc_model,
)
from lora_ops.config import TrainConfig
from lora_ops.errors import InputError, LoraOpsError
from lora_ops.lora.spec import LoraSpec
from lora_ops.settings import get_settings

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY_TAG = "idempotency_key"
ADAPTER_PATH_TAG = "adapter_path"
DESIGN_TAGS = (
    "base_model",
    "base_model_sha256",
    "dataset_sha256",
    "lora_r",
    "lora_alpha",
    "target_modules",
    "eval_loss",
    "base_eval_loss",
    "gate",
)
GATE_VALUES = ("passed", "failed")
LOGGED_MODEL_NAME = "adapter"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
READY_TIMEOUT_S = 300.0
# Config fields that cannot change the trained weights, so they stay out of the key.
_NOT_IN_KEY = frozenset({"checkpoint_every"})
_MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))?/?")


def idempotency_key(base_sha256: str, dataset_sha256: str, config: TrainConfig) -> str:
    """The sha256 that names one (base weights, dataset, training config) combination.

    Canonical JSON (sorted keys, no spaces) of the three; ``target_modules`` is sorted, as
    its order cannot change the adapter, and ``checkpoint_every`` is left out.

    Raises:
        InputError: a hash is not a sha256 hex digest.
    """
    for field, value in (("base_sha256", base_sha256), ("dataset_sha256", dataset_sha256)):
        if not names.SHA256.fullmatch(value):
            raise InputError(f"{value!r} is not a sha256 hex digest", field=field)
    dumped = {k: v for k, v in config.model_dump(mode="json").items() if k not in _NOT_IN_KEY}
    dumped["lora"]["target_modules"] = sorted(dumped["lora"]["target_modules"])
    record = {"base_sha256": base_sha256, "config": dumped, "dataset_sha256": dataset_sha256}
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def adapter_tags(
    *,
    base_model: str,
    base_model_sha256: str,
    dataset_sha256: str,
    lora: LoraSpec,
    eval_loss: float,
    base_eval_loss: float,
    gate_passed: bool,
) -> dict[str, str]:
    """DESIGN.md's version tags (all but ``customer``, which the registry adds) as strings."""
    return {
        "base_model": base_model,
        "base_model_sha256": base_model_sha256,
        "dataset_sha256": dataset_sha256,
        "lora_r": str(lora.r),
        "lora_alpha": str(lora.alpha),
        "target_modules": ",".join(sorted(lora.target_modules)),
        "eval_loss": f"{eval_loss:.6g}",
        "base_eval_loss": f"{base_eval_loss:.6g}",
        "gate": "passed" if gate_passed else "failed",
    }


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
class AdapterVersion:
    """One registered version of ``adapter-<customer>``, as lora-ops reads it."""

    customer: str
    version: str
    tags: Mapping[str, str]
    aliases: tuple[str, ...]
    run_id: str | None
    source: str
    status: str
    description: str

    @classmethod
    def of(cls, mv: ModelVersion) -> AdapterVersion:
        return cls(
            customer=str(mv.name).removeprefix("adapter-"),
            version=str(mv.version),
            tags=dict(mv.tags or {}),
            aliases=tuple(mv.aliases or ()),
            run_id=mv.run_id or None,
            source=str(mv.source),
            status=str(mv.status),
            description=str(mv.description or ""),
        )


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """One tracked training run: its id, status and tags."""

    run_id: str
    status: str
    tags: Mapping[str, str]

    @classmethod
    def of(cls, run: Run) -> TrainingRun:
        return cls(str(run.info.run_id), str(run.info.status), dict(run.data.tags))


class RegistryUnavailable(LoraOpsError):
    """The MLflow server could not be reached (down, restarting, or the network)."""


class ArtifactsUnavailable(LoraOpsError):
    """MLflow could not hand out a run's or model's files."""


# Words requests/urllib3 use when no answer came at all, as opposed to an answer saying no.
_UNREACHABLE = ("Max retries exceeded", "Connection refused", "Failed to establish", "timed out")


class _ClearErrors:
    """An MlflowClient whose calls fail with "MLflow at URL is unreachable" when the server
    does not answer, instead of a page of urllib3 text; everything else passes through."""

    def __init__(self, client: mlflow.MlflowClient, tracking_uri: str) -> None:
        self._client = client
        self._tracking_uri = tracking_uri

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except MlflowException as exc:
                if not any(words in str(exc) for words in _UNREACHABLE):
                    raise
                raise RegistryUnavailable(
                    f"MLflow at {self._tracking_uri} is unreachable ({name} failed); "
                    "is the tracking server running?"
                ) from exc

        return call


class Registry:
    """Runs and registered adapter versions of every customer in one MLflow installation.

    Args:
        tracking_uri: the MLflow tracking (and registry) URI; default
            ``Settings.mlflow_tracking_uri`` (``MLFLOW_TRACKING_URI``).
        artifact_root: where new experiments keep their artifacts
            (``<root>/<customer>``). Unset: the server decides, except for a
            ``sqlite:///`` store, whose artifacts go to ``mlartifacts/`` beside the database
            file (MLflow's own default is ``./mlruns`` under whatever the working folder is).
    """

    def __init__(self, tracking_uri: str | None = None, artifact_root: str | None = None) -> None:
        self.tracking_uri = tracking_uri or get_settings().mlflow_tracking_uri
        self.artifact_root = artifact_root or _default_artifact_root(self.tracking_uri)
        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.client = cast(mlflow.MlflowClient, _ClearErrors(client, self.tracking_uri))

    def check_reachable(self, timeout_s: float = 3.0) -> None:
        """Raise ``RegistryUnavailable`` at once when the tracking server does not answer.

        MLflow's client retries a dead server for minutes, a warning a try; a caller that
        has something better to do meanwhile (a replica serving its base model) asks this
        first. Stores that are not servers (``sqlite:///``, folders) are always reachable.
        """
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        url = self.tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if response.status == 200:
                    return
                problem = f"answered {response.status}"
        except urllib.error.HTTPError as exc:
            problem = f"answered {exc.code}"
        except (OSError, ValueError) as exc:
            problem = str(getattr(exc, "reason", exc))
        raise RegistryUnavailable(f"MLflow at {self.tracking_uri} is unreachable ({problem})")

    # -- runs ---------------------------------------------------------------------------

    def experiment_id(self, customer: str) -> str:
        """The id of experiment ``lora-ops/<customer>``, created (or restored) if needed."""
        name = names.experiment_name(customer)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = f"{self.artifact_root}/{customer}" if self.artifact_root else None
            try:
                return self.client.create_experiment(
                    name, artifact_location=location, tags={"customer": customer}
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
        run_tags = {**(tags or {}), "customer": customer}
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

    @contextmanager
    def _artifact_errors_explained(self, what: str) -> Iterator[None]:
        """MLflow reports an artifact store it cannot reach as a wrong path; say both."""
        try:
            yield
        except RegistryUnavailable:
            raise
        except MlflowException as exc:
            raise ArtifactsUnavailable(
                f"MLflow at {self.tracking_uri} could not serve {what}: {exc.message} (when "
                "the path is right, its artifact store, S3, is down or refusing access)"
            ) from exc

    # -- registered versions --------------------------------------------------------------

    def find_version(self, customer: str, key: str) -> AdapterVersion | None:
        """The version of ``adapter-<customer>`` registered under idempotency ``key``, if any."""
        name = names.registered_model_name(customer)
        if not names.SHA256.fullmatch(key):
            raise InputError(f"{key!r} is not a sha256 hex digest", field="key")
        query = f"name = '{name}' and tags.{IDEMPOTENCY_KEY_TAG} = '{key}'"
        try:
            found = list(self.client.search_model_versions(query))
        except MlflowException as exc:  # a store without tag filters: scan the versions
            log.debug("tag filter refused (%s); scanning %s", exc, name)
            every = self.client.search_model_versions(f"name = '{name}'")
            found = [v for v in every if v.tags.get(IDEMPOTENCY_KEY_TAG) == key]
        return AdapterVersion.of(min(found, key=lambda v: int(v.version))) if found else None

    def register_adapter(
        self,
        customer: str,
        run_id: str,
        adapter_dir: Path,
        tags: Mapping[str, Any],
        description: str,
        key: str,
    ) -> AdapterVersion:
        """Log the adapter as a pyfunc model of the run and register it as the candidate.

        Idempotent: when a version with this ``key`` exists it is returned untouched. A
        failure after the version is created deletes that version before re-raising, so
        no half-registered version stays behind.

        Args:
            customer: the customer id.
            run_id: the run the adapter came from (its model becomes the run's output).
            adapter_dir: a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).
            tags: DESIGN.md's version tags (see :func:`adapter_tags`); ``customer``,
                ``idempotency_key`` and ``adapter_path`` are added here.
            description: the version's description in the registry.
            key: :func:`idempotency_key` of what was trained.

        Returns:
            The READY version, with alias ``candidate``.

        Raises:
            InputError: a tag is missing or the folder is not a PEFT adapter (before any
                I/O), or the run belongs to another customer.
        """
        name = names.registered_model_name(customer)
        version_tags = _version_tags(customer, tags, key)
        adapter_dir = check_adapter_dir(Path(adapter_dir))
        existing = self.find_version(customer, key)
        if existing is not None:
            log.info("%s version %s already holds key %s", name, existing.version, key[:12])
            return existing
        model, adapter_path = self._log_pyfunc(customer, run_id, adapter_dir, version_tags)
        self._ensure_registered_model(name, customer)
        version = str(
            self.client.create_model_version(
                name,
                source=model.artifact_location,  # not models:/<id>: see _log_pyfunc
                run_id=run_id,
                model_id=model.model_id,
                tags={**version_tags, ADAPTER_PATH_TAG: adapter_path},
                description=description,
                await_creation_for=0,
            ).version
        )
        try:
            self._wait_ready(name, version)
            self.client.set_registered_model_alias(name, names.CANDIDATE, version)
            registered = self.client.get_model_version(name, version)
        except BaseException:
            log.error("registering %s version %s failed: deleting it", name, version)
            self._delete_version(name, version)
            raise
        log.info("registered %s version %s as %s", name, version, names.CANDIDATE)
        return AdapterVersion.of(registered)

    def _log_pyfunc(
        self, customer: str, run_id: str, adapter_dir: Path, tags: Mapping[str, str]
    ) -> tuple[LoggedModel, str]:
        """Log the adapter as the run's pyfunc LoggedModel; returns it and the PEFT path in it.

        Built from client calls, not ``mlflow.pyfunc.log_model``: that one reads the global
        tracking URI and active run. A version's source is the model's artifact location,
        because a SQL registry resolves a ``models:/m-<id>`` source through the *global*
        tracking URI (MLflow 3.17, sqlalchemy_store.create_model_version).
        """
        experiment_id = self.client.get_run(run_id).info.experiment_id
        experiment = self.client.get_experiment(experiment_id).name
        if experiment != names.experiment_name(customer):
            raise InputError(
                f"run {run_id} is in {experiment!r}, not {customer!r}'s", field="run_id"
            )
        model = self.client.create_logged_model(
            experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id, tags=dict(tags)
        )
        try:
            with tempfile.TemporaryDirectory(prefix="lora-ops-pyfunc-") as tmp:
                mlflow_model = Model(
                    artifact_path=model.artifact_location,
                    run_id=run_id,
                    model_uuid=model.model_id,
                    model_id=model.model_id,
                )
                local = save_pyfunc_model(Path(tmp), adapter_dir, mlflow_model)
                adapter_path = adapter_path_in(local)
                self.client.log_model_artifacts(model.model_id, str(local))
        except BaseException:
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        return model, adapter_path

    def _ensure_registered_model(self, name: str, customer: str) -> None:
        try:
            self.client.create_registered_model(name, tags={"customer": customer})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _wait_ready(self, name: str, version: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.client.get_model_version(name, version).status
            if status == "READY":
                return
            if status != "PENDING_REGISTRATION" or time.monotonic() > deadline:
                raise RuntimeError(f"{name} version {version} is {status}, not READY")
            time.sleep(0.5)

    def _delete_version(self, name: str, version: str) -> None:
        try:
            self.client.delete_model_version(name, version)
        except Exception:
            log.exception("could not delete %s version %s: delete it by hand", name, version)
        else:
            log.warning("deleted the half-registered %s version %s", name, version)

    def get_version(self, customer: str, version: str | int) -> AdapterVersion:
        """One version of ``adapter-<customer>`` (MLflow raises when it does not exist)."""
        name = names.registered_model_name(customer)
        return AdapterVersion.of(self.client.get_model_version(name, str(version)))

    def has_version(self, customer: str, version: str | int) -> bool:
        """Whether ``adapter-<customer>`` has version ``version``."""
        try:
            self.get_version(customer, version)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def set_version_tags(self, customer: str, version: str | int, tags: Mapping[str, str]) -> None:
        """Set tags on one version of ``adapter-<customer>`` (review decisions, notes)."""
        name = names.registered_model_name(customer)
        for key, value in tags.items():
            self.client.set_model_version_tag(name, str(version), key, value)

    def latest_versions(self, customer: str, n: int = 5) -> list[AdapterVersion]:
        """The ``n`` newest versions, newest first (empty when nothing is registered)."""
        name = names.registered_model_name(customer)
        found = self.client.search_model_versions(
            f"name = '{name}'", order_by=["version_number DESC"], max_results=n
        )
        return [AdapterVersion.of(mv) for mv in found]

    # -- aliases ------------------------------------------------------------------------

    def get_aliases(self, customer: str) -> dict[str, str | None]:
        """``{"candidate": "3", "production": "2", "previous": None}``: a snapshot to restore."""
        held = self._aliases_of(names.registered_model_name(customer))
        return {alias: held.get(alias) for alias in names.ALIASES}

    def restore_aliases(self, customer: str, snapshot: Mapping[str, str | None]) -> None:
        """Point aliases back as in ``snapshot`` (a rollback hook); ``None`` removes one."""
        name = names.registered_model_name(customer)
        held = self._aliases_of(name)
        for alias, version in snapshot.items():
            if held.get(alias) == (None if version is None else str(version)):
                continue
            if version is None:
                self.client.delete_registered_model_alias(name, alias)
            else:
                self.client.set_registered_model_alias(name, alias, str(version))
            log.info("%s@%s restored to %s", name, alias, version)

    def set_alias(self, customer: str, alias: str, version: str | int) -> None:
        """Point ``alias`` of ``adapter-<customer>`` at ``version``."""
        name = names.registered_model_name(customer)
        self.client.set_registered_model_alias(name, alias, str(version))
        log.info("%s@%s -> version %s", name, alias, version)

    def get_version_by_alias(self, customer: str, alias: str) -> AdapterVersion | None:
        """The version ``alias`` points at; None when the alias (or the model) is missing."""
        version = self._aliases_of(names.registered_model_name(customer)).get(alias)
        return None if version is None else self.get_version(customer, version)

    def promote_to_production(self, customer: str, version: str | int) -> AdapterVersion:
        """Make ``version`` production; the one it replaces becomes ``previous``.

        Promoting the ``previous`` version is a rollback (the two swap). If setting an
        alias fails, the aliases are put back as they were before re-raising.
        """
        name = names.registered_model_name(customer)
        target = str(self.client.get_model_version(name, str(version)).version)
        before = self.get_aliases(customer)
        current = before[names.PRODUCTION]
        if current == target:
            log.info("%s version %s is already production", name, current)
            return self.get_version(customer, target)
        try:
            if current is not None:
                self.client.set_registered_model_alias(name, names.PREVIOUS, current)
            self.client.set_registered_model_alias(name, names.PRODUCTION, target)
        except BaseException:
            log.error("promoting %s version %s failed: restoring aliases", name, target)
            try:
                self.restore_aliases(customer, before)
            except Exception:
                log.exception("could not restore %s's aliases to %s", name, before)
            raise
        log.info("%s: production %s -> %s", name, current, target)
        return self.get_version(customer, target)

    def production_versions(self, base_model: str) -> list[tuple[str, AdapterVersion]]:
        """(customer, version) of every customer whose production adapter fits ``base_model``."""
        found = []
        for model in self.client.search_registered_models("name LIKE 'adapter-%'"):
            version = model.aliases.get(names.PRODUCTION)
            if version is None:
                continue
            adapter = AdapterVersion.of(self.client.get_model_version(model.name, str(version)))
            if adapter.tags.get("base_model") == base_model:
                found.append((adapter.customer, adapter))
        return found

    def _aliases_of(self, name: str) -> dict[str, str]:
        try:
            return {k: str(v) for k, v in self.client.get_registered_model(name).aliases.items()}
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise

    # -- files --------------------------------------------------------------------------

    def download_adapter(self, source: str | tuple[str, str | int], dst: Path) -> Path:
        """Download a registered adapter's model into ``dst``; returns its PEFT folder.

        Args:
            source: ``(customer, alias)``, ``(customer, version)``, or a model URI
                (``models:/adapter-acme@production``, ``models:/adapter-acme/3``,
                ``models:/m-<id>``, or any artifact URI of a model folder).
            dst: a local folder (created if missing).

        Returns:
            The folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        """
        uri = self._artifact_uri(source)
        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        with self._artifact_errors_explained(uri):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dst), tracking_uri=self.tracking_uri
            )
        return peft_folder_in(Path(local))

    def _artifact_uri(self, source: str | tuple[str, str | int]) -> str:
        """Where a model's files are; resolved here because MLflow's ``models:/`` reader
        uses the global registry URI."""
        if isinstance(source, tuple):
            customer, ref = source
            return self._version_uri(names.registered_model_name(customer), ref)
        match = _MODELS_URI.fullmatch(source)
        if match is None:
            return source
        if match["version"] is None and match["alias"] is None:  # models:/m-<logged model id>
            return str(self.client.get_logged_model(match["name"]).artifact_location)
        return self._version_uri(match["name"], match["version"] or match["alias"])

    def _version_uri(self, name: str, ref: str | int) -> str:
        version = str(ref)
        if not version.isdigit():
            held = self._aliases_of(name)
            if version not in held:
                raise InputError(f"{name} has no alias {version!r}", field="alias")
            version = held[version]
        return str(self.client.get_model_version_download_uri(name, version))


def _default_artifact_root(tracking_uri: str) -> str | None:
    if not tracking_uri.startswith("sqlite:///") or ":memory:" in tracking_uri:
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve()
    return (database.parent / "mlartifacts").as_uri()


def _version_tags(customer: str, tags: Mapping[str, Any], key: str) -> dict[str, str]:
    """DESIGN.md's tags, checked, plus ``customer`` and ``idempotency_key``."""
    if not names.SHA256.fullmatch(key):
        raise InputError(f"{key!r} is not a sha256 hex digest", field="key")
    reserved = {IDEMPOTENCY_KEY_TAG, ADAPTER_PATH_TAG} & set(tags)
    if reserved:
        raise InputError(f"set by the registry, not by callers: {sorted(reserved)}", field="tags")
    missing = [tag for tag in DESIGN_TAGS if tag not in tags]
    if missing:
        raise InputError(f"version tags missing: {missing} (see adapter_tags)", field="tags")
    if tags["gate"] not in GATE_VALUES:
        raise InputError(f"{tags['gate']!r} is not one of {GATE_VALUES}", field="tags.gate")
    if tags.get("customer", customer) != customer:
        raise InputError(f"customer tag {tags['customer']!r} is not {customer!r}", field="tags")
    return {**{k: str(v) for k, v in tags.items()}, "customer": customer, IDEMPOTENCY_KEY_TAG: key}
