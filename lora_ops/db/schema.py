"""The schema's revisions: Alembic run in code when a database opens, under a lock."""

from __future__ import annotations

import fcntl
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, Connection, Engine

from lora_ops.errors import LoraOpsError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parents[1] / "migrations"
FLEET_REVISION = "0001"  # the schema every database had before migrations existed
MIGRATION_LOCK_KEY = 0x6C6F7261  # pg_advisory_lock key: "lora" in ASCII

# alembic.context is one proxy per process, so two threads must not migrate at once even
# when their databases differ; the file and advisory locks below cover other processes.
_migrating = threading.Lock()


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
