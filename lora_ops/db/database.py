"""Sessions on the service database, and every query lora-ops makes of it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from lora_ops.db.models import (
    ACTIVE,
    DOWN,
    Customer,
    DeployLock,
    Deployment,
    Placement,
    Replica,
    utcnow,
)
from lora_ops.db.schema import create_engine_for, upgrade_database
from lora_ops.errors import LoraOpsError
from lora_ops.settings import Settings, get_settings

LOCK_EXPIRY = dt.timedelta(minutes=30)


class DeployInProgress(LoraOpsError):
    """Another deploy of the same customer holds the lock."""


class RecordExists(LoraOpsError):
    """A row with the same key is already stored."""


class Database:
    """Sessions on one database, migrated to the newest revision when opened."""

    def __init__(self, url: str | None = None) -> None:
        self.engine = create_engine_for(url or get_settings().database_url)
        upgrade_database(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Database:
        return cls((settings or get_settings()).database_url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions.begin() as session:
            yield session

    @contextmanager
    def deploy_lock(
        self, customer: str, holder: str, expiry: dt.timedelta = LOCK_EXPIRY
    ) -> Iterator[None]:
        """Hold the customer's deploy lock; a second deploy of them fails at once.

        A lock older than ``expiry`` is taken as left behind by a process that died.
        """
        with self.session() as session:
            session.execute(
                delete(DeployLock).where(
                    DeployLock.customer == customer, DeployLock.acquired_at < utcnow() - expiry
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

    # -- replicas and placement ----------------------------------------------------------

    def replica_urls(self) -> list[str]:
        with self.session() as session:
            return list(session.scalars(select(Replica.url).order_by(Replica.id)))

    def replicas(self) -> list[Replica]:
        """Every registered replica, oldest first."""
        with self.session() as session:
            return list(session.scalars(select(Replica).order_by(Replica.id)))

    def add_replica(
        self, url: str, base: str | None = None, base_sha256: str | None = None
    ) -> None:
        """Register a replica, or record the base an already registered one declares."""
        with self.session() as session:
            row = session.scalars(select(Replica).where(Replica.url == url)).first()
            if row is None:
                session.add(Replica(url=url, base=base, base_sha256=base_sha256))
            elif base_sha256 is not None:
                row.base, row.base_sha256 = base, base_sha256

    def set_replica_state(self, url: str, state: str, detail: str = "") -> bool:
        """Put a replica in rotation (``active``) or drain it (``down``); True on a change."""
        if state not in (ACTIVE, DOWN):
            raise ValueError(f"a replica's state is {ACTIVE} or {DOWN}, not {state!r}")
        with self.session() as session:
            row = session.scalars(select(Replica).where(Replica.url == url)).first()
            if row is None or row.state == state:
                return False
            row.state, row.state_detail, row.state_since = state, detail, utcnow()
            return True

    def remove_replica(self, url: str) -> bool:
        """Forget a replica and its placements; False when it was not registered."""
        with self.session() as session:
            session.execute(delete(Placement).where(Placement.replica_url == url))
            # A DELETE runs through a cursor, so it has a rowcount; Session types it loosely.
            result = cast(
                CursorResult[Any], session.execute(delete(Replica).where(Replica.url == url))
            )
            return bool(result.rowcount)

    def placements(self) -> dict[str, list[str]]:
        """Customer -> the replicas its adapter lives on, in the order they were placed."""
        query = select(Placement).order_by(Placement.customer, Placement.placed_at)
        found: dict[str, list[str]] = {}
        with self.session() as session:
            for row in session.scalars(query):
                found.setdefault(row.customer, []).append(row.replica_url)
        return found

    def placed_bases(self) -> dict[str, str]:
        """Customer -> the base sha256 it was placed for."""
        with self.session() as session:
            rows = session.execute(select(Placement.customer, Placement.base_sha256)).all()
        return {str(customer): str(base) for customer, base in rows}  # noqa: C416 (Row, not tuple)

    def place(self, customer: str, base_sha256: str, urls: list[str]) -> None:
        """Record that ``customer`` lives on ``urls`` (and nowhere else) from now on."""
        with self.session() as session:
            session.execute(delete(Placement).where(Placement.customer == customer))
            now = utcnow()
            session.add_all(
                Placement(
                    customer=customer,
                    replica_url=url,
                    base_sha256=base_sha256,
                    placed_at=now + dt.timedelta(microseconds=rank),  # keeps the order
                )
                for rank, url in enumerate(urls)
            )

    def record_deployment_start(
        self, customer: str, version: str, replicas: list[str], triggered_by: str
    ) -> list[int]:
        """One ``started`` row per replica a deploy goes to; their ids."""
        with self.session() as session:
            rows = [
                Deployment(
                    customer=customer,
                    version=version,
                    replica_url=url,
                    status="started",
                    triggered_by=triggered_by,
                )
                for url in replicas
            ]
            session.add_all(rows)
            session.flush()
            return [row.id for row in rows]

    def record_deployment_end(self, ids: list[int], status: str, detail: str) -> None:
        """Close the rows ``record_deployment_start`` made with their outcome."""
        with self.session() as session:
            for row_id in ids:
                row = session.get(Deployment, row_id)
                if row is not None:
                    row.status, row.detail, row.finished_at = status, detail, utcnow()

    def deployments(self, customer: str | None = None, limit: int = 50) -> list[Deployment]:
        query = select(Deployment).order_by(Deployment.id.desc()).limit(limit)
        if customer is not None:
            query = query.where(Deployment.customer == customer)
        with self.session() as session:
            return list(session.scalars(query))

    def add_customer(self, customer: Customer) -> Customer:
        """Store a new customer row.

        Raises:
            RecordExists: a customer with this id is already stored.
        """
        customer.created_at = customer.updated_at = utcnow()
        try:
            with self.session() as session:
                session.add(customer)
        except IntegrityError:
            raise RecordExists(f"customer {customer.id} already exists") from None
        return customer

    def customer(self, customer_id: str) -> Customer | None:
        with self.session() as session:
            return session.get(Customer, customer_id)

    def customers(self, active_only: bool = False) -> list[Customer]:
        """Customer rows ordered by id."""
        query = select(Customer).order_by(Customer.id)
        if active_only:
            query = query.where(Customer.active.is_(True))
        with self.session() as session:
            return list(session.scalars(query))

    def update_customer(self, customer_id: str, values: Mapping[str, Any]) -> Customer | None:
        """Set columns of one customer and its ``updated_at``; None when there is no such row."""
        unknown = set(values) - set(Customer.__table__.columns.keys())
        if unknown:
            raise ValueError(f"customers has no column(s) {sorted(unknown)}")
        with self.session() as session:
            row = session.get(Customer, customer_id)
            if row is None:
                return None
            for name, value in values.items():
                setattr(row, name, value)
            row.updated_at = utcnow()
        return row

    def remove_customer(self, customer_id: str) -> bool:
        """Delete one customer row; False when there was none."""
        with self.session() as session:
            row = session.get(Customer, customer_id)
            if row is not None:
                session.delete(row)
        return row is not None
