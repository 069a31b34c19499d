"""The service database (SQLAlchemy 2): replicas, deployment history, per-customer deploy locks.

SQLite by default; any SQLAlchemy URL (Postgres) works. The one home of SQLAlchemy.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import DateTime, Integer, String, Text, create_engine, delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from lora_ops.errors import LoraOpsError
from lora_ops.settings import Settings, get_settings

LOCK_EXPIRY = dt.timedelta(minutes=30)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Replica(Base):
    __tablename__ = "replicas"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(String(512), unique=True)
    added_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


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


class DeployInProgress(LoraOpsError):
    """Another deploy of the same customer holds the lock."""


class Database:
    """Sessions on one database; tables are created on first use."""

    def __init__(self, url: str | None = None) -> None:
        url = url or get_settings().database_url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url)
        Base.metadata.create_all(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Database:
        return cls((settings or get_settings()).database_url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions.begin() as session:
            yield session

    @contextmanager
    def deploy_lock(self, customer: str, holder: str) -> Iterator[None]:
        """Hold the customer's deploy lock; a second deploy of them fails at once."""
        with self.session() as session:
            session.execute(
                delete(DeployLock).where(
                    DeployLock.customer == customer, DeployLock.acquired_at < utcnow() - LOCK_EXPIRY
                )
            )
        try:
            with self.session() as session:
                session.add(DeployLock(customer=customer, holder=holder))
        except IntegrityError:
            with self.session() as session:
                held = session.get(DeployLock, customer)
            who = held.holder if held else "another deploy"
            raise DeployInProgress(f"a deploy of {customer} is already running ({who})") from None
        try:
            yield
        finally:
            with self.session() as session:
                session.execute(delete(DeployLock).where(DeployLock.customer == customer))

    def replica_urls(self) -> list[str]:
        with self.session() as session:
            return list(session.scalars(select(Replica.url).order_by(Replica.id)))

    def deployments(self, customer: str | None = None, limit: int = 50) -> list[Deployment]:
        query = select(Deployment).order_by(Deployment.id.desc()).limit(limit)
        if customer is not None:
            query = query.where(Deployment.customer == customer)
        with self.session() as session:
            return list(session.scalars(query))
