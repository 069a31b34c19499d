"""Customer records: whose adapter, trained on what, how, when, and whether it deploys itself.

A record is checked whole at the door (``CustomerSpec``): nothing is written when any field
is bad, and every refusal is an ``InputError`` naming the field (``training.lora.r``). The
records live in the service database (lora_ops.db); this module talks to nothing else.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import cronsim
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lora_ops import names
from lora_ops.config import TrainConfig
from lora_ops.db import Customer, Database, RecordExists
from lora_ops.defaults import DEFAULT_BASE, DEFAULT_GATE, EvalGate
from lora_ops.errors import InputError

CRON_FIELDS = "minute hour day-of-month month day-of-week"

# Fields of a stored record that an update leaves alone: their files were checked when written.
# A context variable, not pydantic's validation context, which a custom __init__ never sees.
_STORED: ContextVar[frozenset[str]] = ContextVar("stored_fields", default=frozenset())

DisplayName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class CustomerSpec(BaseModel):
    """What one customer's adapter is made from and how its retraining runs.

    Building one checks every field; a refusal raises ``InputError`` with ``field`` set to
    the field's path. Local paths (data file, base folder) are stored absolute, because
    workers run in other folders.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="Customer id: 1-63 characters of a-z, 0-9 and '-'.")
    display_name: DisplayName = Field("", description="Shown to people; defaults to the id.")
    data_uri: str = Field(description="The chat JSONL: s3://bucket/key or a local file.")
    validation_data_uri: str | None = Field(
        None,
        description="Held-out chat JSONL (s3:// or a local file) to evaluate on instead of "
        "a share of the data; None: the share (training.eval_fraction).",
    )
    base_model: str = Field(DEFAULT_BASE, description="A catalogue name or a local folder.")
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="TrainConfig overrides only, nested: {'lora': {'r': 16}, 'max_steps': 60}.",
    )
    min_improvement: float = Field(
        DEFAULT_GATE.min_improvement,
        ge=0,
        lt=1,
        description=EvalGate.model_fields["min_improvement"].description,
    )
    production_tolerance: float = Field(
        DEFAULT_GATE.production_tolerance,
        ge=0,
        lt=1,
        description=EvalGate.model_fields["production_tolerance"].description,
    )
    schedule: str | None = Field(None, description=f"Cron ({CRON_FIELDS}); None: no schedule.")
    timezone: str = Field("UTC", description="IANA time zone the schedule is read in.")
    auto_deploy: bool = Field(False, description="Deploy a version that passes the gate.")
    require_review: bool = Field(False, description="Hold deploys until a person approves.")
    active: bool = Field(True, description="Inactive customers keep their record but never run.")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _input_error(exc) from None

    @classmethod
    def checked(cls, values: Mapping[str, Any], *, stored: Iterable[str] = ()) -> CustomerSpec:
        """Check ``values`` as a whole; ``stored`` fields were checked when first written.

        Raises:
            InputError: a field is bad; ``field`` names it.
        """
        token = _STORED.set(frozenset(stored))
        try:
            return cls(**values)
        finally:
            _STORED.reset(token)

    def train_config(self) -> TrainConfig:
        """The defaults with this customer's overrides applied."""
        return TrainConfig.model_validate(self.training)

    @model_validator(mode="before")
    @classmethod
    def _display_name_defaults_to_id(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("display_name") is None:
            return {**values, "display_name": values.get("id")}
        return values

    @field_validator("id")
    @classmethod
    def _check_id(cls, customer_id: str) -> str:
        try:
            return names.check_customer(customer_id)
        except InputError as exc:
            raise ValueError(exc.reason) from None

    @field_validator("data_uri", "validation_data_uri")
    @classmethod
    def _check_data_uri(cls, uri: str | None, info: ValidationInfo) -> str | None:
        if uri is None:
            return None
        if uri.startswith("s3://"):
            return _check_s3_file(uri)
        if "://" in uri:
            raise ValueError(f"{uri!r}: only s3:// URIs and local files are supported")
        if _was_stored(info):
            return uri  # the file was there when it was added; it may be moved by now
        path = Path(uri).expanduser()
        if not path.is_file():
            raise ValueError(f"{uri!r} is not a file")
        return str(path.resolve())

    @field_validator("base_model")
    @classmethod
    def _check_base_model(cls, name: str, info: ValidationInfo) -> str:
        catalogue = _catalogue()
        if name in catalogue or _was_stored(info):
            return name
        folder = Path(name).expanduser()
        if folder.is_dir() and (folder / "config.json").is_file():
            return str(folder.resolve())
        raise ValueError(
            f"{name!r} is neither a catalogue model ({', '.join(catalogue)}) "
            "nor a folder holding a transformers config.json"
        )

    @field_validator("training")
    @classmethod
    def _check_training(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        try:
            config = TrainConfig.model_validate(overrides)
        except ValidationError as exc:
            path, reason = _describe(exc)
            raise InputError(reason, field=path) from None
        return _canonical(overrides, config.model_dump(mode="json"))

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, expr: str | None) -> str | None:
        if expr is None:
            return None
        fields = expr.split()
        if len(fields) != 5:
            raise ValueError(
                f"{expr!r} is not a cron schedule: it needs 5 fields ({CRON_FIELDS}), "
                "like '0 3 * * *' for 03:00 every day"
            )
        try:
            cronsim.CronSim(" ".join(fields), dt.datetime.now(dt.UTC))
        except cronsim.CronSimError as exc:
            raise ValueError(f"{expr!r} is not a cron schedule: {exc}") from None
        return " ".join(fields)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{name!r} is not an IANA time zone (like 'UTC' or 'Europe/Paris')"
            ) from None
        return name


class CustomerRecord(CustomerSpec):
    """A stored customer: its spec plus when it was added and last changed (naive UTC).

    Made only from rows that were checked when written, so it is never checked again:
    reading a record must not demand that its data file still exist.
    """

    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def spec(self) -> CustomerSpec:
        """The record without its timestamps."""
        return CustomerSpec.model_construct(**self.model_dump(exclude={"created_at", "updated_at"}))


def add(spec: CustomerSpec, *, db: Database | None = None) -> CustomerRecord:
    """Store a new customer.

    Raises:
        InputError: the id is already taken.
    """
    db = db or Database.from_settings()
    if db.customer(spec.id) is not None:
        raise _already_exists(spec.id)
    try:
        return _record(db.add_customer(Customer(**_columns(spec))))
    except RecordExists:
        raise _already_exists(spec.id) from None  # added by someone else meanwhile


def find(customer_id: str, *, db: Database | None = None) -> CustomerRecord | None:
    """The record of one customer, or None when there is none.

    Raises:
        InputError: the id is malformed.
    """
    row = (db or Database.from_settings()).customer(names.check_customer(customer_id))
    return None if row is None else _record(row)


def get(customer_id: str, *, db: Database | None = None) -> CustomerRecord:
    """The record of one customer.

    Raises:
        InputError: the id is malformed or unknown.
    """
    record = find(customer_id, db=db)
    if record is None:
        raise _unknown(customer_id)
    return record


def list_customers(
    active_only: bool = False, *, db: Database | None = None
) -> list[CustomerRecord]:
    """Every customer (or only the active ones), ordered by id."""
    return [_record(row) for row in (db or Database.from_settings()).customers(active_only)]


def update(customer_id: str, *, db: Database | None = None, **changes: Any) -> CustomerRecord:
    """Change some fields; ``training`` merges into the stored overrides key by key.

    ``schedule=None`` clears the schedule. The merged record is checked whole before
    anything is written.

    Raises:
        InputError: the id is unknown, or the merged record has a bad field.
    """
    db = db or Database.from_settings()
    spec = merge_changes(get(customer_id, db=db).spec, changes)
    row = db.update_customer(customer_id, _columns(spec))
    if row is None:
        raise _unknown(customer_id)  # removed meanwhile
    return _record(row)


def remove(customer_id: str, *, db: Database | None = None) -> None:
    """Delete one customer's record (its adapters and runs stay in MLflow).

    Raises:
        InputError: the id is malformed or unknown.
    """
    db = db or Database.from_settings()
    if not db.remove_customer(names.check_customer(customer_id)):
        raise _unknown(customer_id)


def merge_changes(spec: CustomerSpec, changes: Mapping[str, Any]) -> CustomerSpec:
    """``spec`` with ``changes`` applied and the result checked whole.

    Raises:
        InputError: a change would rename the customer, or the result has a bad field.
    """
    if "id" in changes and changes["id"] != spec.id:
        raise InputError("a customer's id cannot change; add a new customer instead", field="id")
    current = spec.model_dump()
    merged = {**current, **changes}
    if "training" in changes:
        merged["training"] = merge_overrides(current["training"], changes["training"])
    return CustomerSpec.checked(merged, stored=set(current) - set(changes))


def merge_overrides(base: Any, overrides: Any) -> Any:
    """``overrides`` laid over ``base`` key by key, nested dicts too (``lora``); not in place.

    Anything that is not a mapping replaces what was there, so a bad value reaches the check.
    """
    if not isinstance(base, Mapping) or not isinstance(overrides, Mapping):
        return overrides
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge_overrides(base.get(key), value)
    return merged


def retrain_parameters(spec: CustomerSpec) -> dict[str, Any]:
    """The JSON-ready parameters of the ``retrain`` flow for this customer (or record)."""
    return {
        "customer": spec.id,
        "data_uri": spec.data_uri,
        "validation_data_uri": spec.validation_data_uri,
        "base": spec.base_model,
        "config": spec.train_config().model_dump(mode="json"),
        "min_improvement": spec.min_improvement,
        "production_tolerance": spec.production_tolerance,
        "auto_deploy": spec.auto_deploy,
        "require_review": spec.require_review,
    }


def _catalogue() -> list[str]:
    # Imported here: base_models pulls in transformers (seconds), which reading records never needs.
    from lora_ops import base_models

    return list(base_models.CATALOGUE)


def _check_s3_file(uri: str) -> str:
    try:
        _, key = names.parse_s3_uri(uri)
    except InputError as exc:
        raise ValueError(exc.reason) from None
    if not key or key.endswith("/"):
        raise ValueError(f"{uri!r} names a folder; give the key of the JSONL file")
    return uri


def _was_stored(info: ValidationInfo) -> bool:
    return info.field_name in _STORED.get()


def _canonical(overrides: Mapping[str, Any], full: Mapping[str, Any]) -> dict[str, Any]:
    """The overridden keys only, with the values as the config parsed them ("1e-3" -> 0.001)."""
    return {
        key: _canonical(value, full[key])
        if isinstance(value, Mapping) and isinstance(full[key], Mapping)
        else full[key]
        for key, value in overrides.items()
    }


def _describe(exc: ValidationError) -> tuple[str, str]:
    """(field path, reason) of the first error, e.g. ("lora.r", "must be ... >= 1, got 0")."""
    error = exc.errors()[0]
    path = ".".join(str(part) for part in error["loc"])
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, InputError):
        inner = cause.field or ""
        return ".".join(part for part in (path, inner) if part), cause.reason
    if isinstance(cause, Exception):
        return path, str(cause)
    if error["type"] == "missing":
        return path, "is required"
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return path, "is not a known setting"
    return path, f"{error['msg']}, got {error['input']!r}"


def _input_error(exc: ValidationError) -> InputError:
    path, reason = _describe(exc)
    return InputError(reason, field=path or None)


def _already_exists(customer_id: str) -> InputError:
    return InputError(
        f"customer {customer_id} already exists; use `lora-ops customers update`", field="id"
    )


def _unknown(customer_id: str) -> InputError:
    return InputError(
        f"no customer {customer_id!r}; see `lora-ops customers list`", field="customer"
    )


def _columns(spec: CustomerSpec) -> dict[str, Any]:
    return {
        "id": spec.id,
        "display_name": spec.display_name,
        "data_uri": spec.data_uri,
        "validation_data_uri": spec.validation_data_uri,
        "base_model": spec.base_model,
        "training_overrides": json.dumps(spec.training, sort_keys=True),
        "min_improvement": spec.min_improvement,
        "production_tolerance": spec.production_tolerance,
        "schedule_cron": spec.schedule,
        "schedule_timezone": spec.timezone,
        "auto_deploy": spec.auto_deploy,
        "require_review": spec.require_review,
        "active": spec.active,
    }


def _record(row: Customer) -> CustomerRecord:
    return CustomerRecord.model_construct(
        id=row.id,
        display_name=row.display_name,
        data_uri=row.data_uri,
        validation_data_uri=row.validation_data_uri,
        base_model=row.base_model,
        training=json.loads(row.training_overrides),
        min_improvement=row.min_improvement,
        production_tolerance=row.production_tolerance,
        schedule=row.schedule_cron,
        timezone=row.schedule_timezone,
        auto_deploy=row.auto_deploy,
        require_review=row.require_review,
        active=row.active,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
