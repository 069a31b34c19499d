"""Registered adapter versions: register one, look versions up, move aliases, fetch files.

A customer's adapters are versions of registered model ``adapter-<customer>`` (DESIGN.md),
with aliases ``candidate`` / ``production`` / ``previous``. Each version is an MLflow
*pyfunc* model (:mod:`lora_ops.adapter_pyfunc`): the PEFT folder sits at the version tag
``adapter_path`` inside it, and ``mlflow.pyfunc.load_model("models:/adapter-<customer>@
production")`` answers prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from lora_ops import names
from lora_ops.adapter_pyfunc import (
    adapter_path_in,
    check_adapter_dir,
    peft_folder_in,
    save_pyfunc_model,
)
from lora_ops.errors import InputError
from lora_ops.registry.connection import Connection
from lora_ops.registry.tags import (
    ADAPTER_PATH_TAG,
    BASE_MODEL_TAG,
    CUSTOMER_TAG,
    IDEMPOTENCY_KEY_TAG,
    version_tags,
)

log = logging.getLogger(__name__)

LOGGED_MODEL_NAME = "adapter"
READY_TIMEOUT_S = 300.0
_MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))?/?")


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


class AdapterVersions(Connection):
    """Every customer's registered adapters in one MLflow installation; built as a Connection
    is."""

    # -- registering ----------------------------------------------------------------------

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
        checked_tags = version_tags(customer, tags, key)
        adapter_dir = check_adapter_dir(Path(adapter_dir))
        existing = self.find_version(customer, key)
        if existing is not None:
            log.info("%s version %s already holds key %s", name, existing.version, key[:12])
            return existing
        model, adapter_path = self._log_pyfunc(customer, run_id, adapter_dir, checked_tags)
        self._ensure_registered_model(name, customer)
        version = str(
            self.client.create_model_version(
                name,
                source=model.artifact_location,  # not models:/<id>: see _log_pyfunc
                run_id=run_id,
                model_id=model.model_id,
                tags={**checked_tags, ADAPTER_PATH_TAG: adapter_path},
                description=description,
                await_creation_for=0,
            ).version
        )
        registered = self._make_candidate(name, version)
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
            self.client.create_registered_model(name, tags={CUSTOMER_TAG: customer})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _make_candidate(self, name: str, version: str) -> ModelVersion:
        """Wait for a new version to be READY and point ``candidate`` at it.

        Any failure on the way deletes the version before re-raising, so no half-registered
        version stays behind.
        """
        try:
            self._wait_ready(name, version)
            self.client.set_registered_model_alias(name, names.CANDIDATE, version)
            return self.client.get_model_version(name, version)
        except BaseException:
            log.error("registering %s version %s failed: deleting it", name, version)
            self._delete_version(name, version)
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

    # -- looking up -----------------------------------------------------------------------

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

    # -- aliases --------------------------------------------------------------------------

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

    def production_versions(
        self, base_model: str | None = None
    ) -> list[tuple[str, AdapterVersion]]:
        """(customer, version) of every production adapter (that fits ``base_model``, if given)."""
        found = []
        for model in self.client.search_registered_models("name LIKE 'adapter-%'"):
            version = model.aliases.get(names.PRODUCTION)
            if version is None:
                continue
            adapter = AdapterVersion.of(self.client.get_model_version(model.name, str(version)))
            if base_model is None or adapter.tags.get(BASE_MODEL_TAG) == base_model:
                found.append((adapter.customer, adapter))
        return found

    def _aliases_of(self, name: str) -> dict[str, str]:
        try:
            return {k: str(v) for k, v in self.client.get_registered_model(name).aliases.items()}
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise

    # -- files ----------------------------------------------------------------------------

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
