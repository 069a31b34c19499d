"""The service database's tables, as SQLAlchemy models."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, DateTime, Float, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from lora_ops.defaults import DEFAULT_GATE

ACTIVE = "active"  # a replica in rotation: placement and routing use it
DOWN = "down"  # drained: out of placement until it answers again


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Replica(Base):
    __tablename__ = "replicas"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(String(512), unique=True)
    added_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # What it serves, as it declared when added: adapters go only to replicas of their base.
    base: Mapped[str | None] = mapped_column(String(512), nullable=True)
    base_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=ACTIVE, server_default=ACTIVE)
    state_detail: Mapped[str] = mapped_column(Text, default="", server_default="")
    state_since: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Deployment(Base):
    """One adapter version going onto one replica."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    customer: Mapped[str] = mapped_column(String(63), index=True)
    version: Mapped[str] = mapped_column(String(32))
    replica_url: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16))  # started, succeeded, failed, rolled_back
    triggered_by: Mapped[str] = mapped_column(String(128))
    detail: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class DeployLock(Base):
    __tablename__ = "deploy_locks"

    customer: Mapped[str] = mapped_column(String(63), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    acquired_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Customer(Base):
    """One customer's record; lora_ops.customers checks every value before it lands here."""

    __tablename__ = "customers"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200))
    data_uri: Mapped[str] = mapped_column(Text)
    validation_data_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    base_model: Mapped[str] = mapped_column(String(512))
    training_overrides: Mapped[str] = mapped_column(Text, default="{}")  # a JSON object
    min_improvement: Mapped[float] = mapped_column(Float, default=DEFAULT_GATE.min_improvement)
    production_tolerance: Mapped[float] = mapped_column(
        Float, default=DEFAULT_GATE.production_tolerance
    )
    schedule_cron: Mapped[str | None] = mapped_column(String(120), nullable=True)
    schedule_timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    auto_deploy: Mapped[bool] = mapped_column(Boolean, default=False)
    require_review: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Placement(Base):
    """One replica a customer's production adapter lives on."""

    __tablename__ = "placements"

    customer: Mapped[str] = mapped_column(String(63), primary_key=True)
    replica_url: Mapped[str] = mapped_column(String(512), primary_key=True, index=True)
    base_sha256: Mapped[str] = mapped_column(String(64))
    placed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ApiKey(Base):
    """A customer's key to the fine-tuning API: only its sha256 is stored."""

    __tablename__ = "api_keys"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    customer: Mapped[str] = mapped_column(String(63), index=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class UploadedFile(Base):
    """A file a customer uploaded for fine-tuning, checked before it was stored in S3."""

    __tablename__ = "uploaded_files"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    customer: Mapped[str] = mapped_column(String(63), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    examples: Mapped[int] = mapped_column(Integer)
    uri: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class FineTuningJob(Base):
    """One fine-tuning job: the flow runs of ``retrain/<customer>`` it made, and its end."""

    __tablename__ = "fine_tuning_jobs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    customer: Mapped[str] = mapped_column(String(63), index=True)
    model: Mapped[str] = mapped_column(String(512))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    hyperparameters: Mapped[str] = mapped_column(Text)  # OpenAI's, as resolved: a JSON object
    parameters: Mapped[str] = mapped_column(Text)  # the retrain flow run's: a JSON object
    job_metadata: Mapped[str] = mapped_column(Text, default="{}")
    run_key: Mapped[str] = mapped_column(String(128))  # the training run's idempotency key
    status: Mapped[str] = mapped_column(String(32))
    flow_run_ids: Mapped[str] = mapped_column(Text, default="[]")  # oldest first; JSON list
    fine_tuned_model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # a JSON object
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    notified: Mapped[bool] = mapped_column(Boolean, default=False)  # its webhook was sent
