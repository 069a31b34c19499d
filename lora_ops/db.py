"""The service database (SQLAlchemy 2): replicas, deployments, deploy locks and customers.

SQLite by default; any SQLAlchemy URL (Postgres) works. The one home of SQLAlchemy and of
its migrations (Alembic, in ``lora_ops/migrations``): opening a Database first brings its
schema to the newest revision, so a database made by any older lora-ops keeps its rows.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Boolean,
    CursorResult,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from lora_ops.defaults import DEFAULT_GATE
from lora_ops.errors import LoraOpsError
from lora_ops.settings import Settings, get_settings

log = logging.getLogger(__name__)

LOCK_EXPIRY = dt.timedelta(minutes=30)
MIGRATIONS = Path(__file__).parent / "migrations"
FLEET_REVISION = "0001"  # the schema every database had before migrations existed
MIGRATION_LOCK_KEY = 0x6C6F7261  # pg_advisory_lock key: "lora" in ASCII

# alembic.context is one proxy per process, so two threads must not migrate at once even
# when their databases differ; the file and advisory locks below cover other processes.
_migrating = threading.Lock()


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


class Customer(Base):
    """One customer's record; lora_ops.customers checks every value before it lands here."""

    __tablename__ = "customers"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200))
    data_uri: Mapped[str] = mapped_column(Text)
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


class DeployInProgress(LoraOpsError):
    """Another deploy of the same customer holds the lock."""


class RecordExists(LoraOpsError):
    """A row with the same key is already stored."""


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code; ``env.py`` migrates ``connection`` if given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision shipped with this lora-ops."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise LoraOpsError(f"no migrations found in {MIGRATIONS}")
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision a database is at; None when it has never been migrated."""
    return MigrationContext.configure(connection).get_current_revision()


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite database; None for other databases and in-memory SQLite."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(str(url.database))


def create_engine_for(url: str) -> Engine:
    """An engine on ``url``; a SQLite file's folder is made first, as SQLite will not."""
    engine = create_engine(url)
    path = sqlite_file(engine.url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return engine


def database_revision(url: str) -> tuple[str | None, str]:
    """(current, head) revisions of the database at ``url``, without changing it."""
    head = head_revision()
    engine = create_engine(url)
    try:
        path = sqlite_file(engine.url)
        if path is not None and not path.exists():
            return None, head  # connecting would create an empty file
        with engine.connect() as connection:
            return current_revision(connection), head
    finally:
        engine.dispose()


def upgrade_database(engine: Engine) -> list[str]:
    """Bring the database to the newest revision; return the revisions applied, oldest first.

    One query when it is already there. Otherwise it migrates under a lock (a file beside a
    SQLite database, ``pg_advisory_lock`` on Postgres), so processes opening one database at
    once migrate it once. A database made before migrations existed is stamped first.
    """
    head = head_revision()
    with engine.connect() as connection:
        if current_revision(connection) == head:
            return []
    with _migration_lock(engine) as connection:
        applied = _upgrade(connection, head)
    if applied:
        log.info("service database migrated to %s (applied %s)", head, ", ".join(applied))
    return applied


def _upgrade(connection: Connection, head: str) -> list[str]:
    config = alembic_config(connection)
    script = ScriptDirectory.from_config(config)
    with connection.begin():
        current = current_revision(connection)  # again: another process may have migrated
        if current == head:
            return []
        if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
            raise LoraOpsError(
                f"the service database is at revision {current}, newer than this lora-ops "
                f"knows (its newest is {head}); upgrade lora-ops to use this database"
            )
        if current is None and inspect(connection).has_table("replicas"):
            # Made by create_all before migrations existed: its tables are revision 0001's.
            command.stamp(config, FLEET_REVISION)
            current = FLEET_REVISION
        command.upgrade(config, "head")
    return [rev.revision for rev in reversed(list(script.iterate_revisions(head, current)))]


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection that alone may migrate this database until the block ends."""
    with _migrating, _file_lock(sqlite_file(engine.url)), engine.connect() as connection:
        if connection.dialect.name != "postgresql":
            yield connection
            return
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()  # the lock belongs to the session and outlives this transaction
        try:
            yield connection
        finally:
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()


@contextmanager
def _file_lock(database: Path | None) -> Iterator[None]:
    """Hold an exclusive flock on ``<database>.lock``; nothing to lock for None."""
    if database is None:
        yield
        return
    # flock, not lockf: each open() gets its own lock, so threads exclude each other too.
    with database.with_name(database.name + ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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

    def add_replica(self, url: str) -> None:
        """Register a replica; one already registered stays as it is."""
        with self.session() as session:
            if session.scalars(select(Replica).where(Replica.url == url)).first() is None:
                session.add(Replica(url=url))

    def remove_replica(self, url: str) -> bool:
        """Forget a replica; False when it was not registered."""
        with self.session() as session:
            # A DELETE runs through a cursor, so it has a rowcount; Session types it loosely.
            result = cast(
                CursorResult[Any], session.execute(delete(Replica).where(Replica.url == url))
            )
            return bool(result.rowcount)

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
