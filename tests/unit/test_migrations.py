"""Migrations of the service database on real SQLite files: fresh, repeated, old, racing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine

from lora_ops.db import (
    Base,
    Database,
    DeployInProgress,
    Replica,
    alembic_config,
    create_engine_for,
    database_revision,
    head_revision,
    upgrade_database,
)
from lora_ops.errors import LoraOpsError

FLEET_TABLES = {"replicas", "deployments", "deploy_locks"}
ALL_TABLES = (
    FLEET_TABLES | {"customers", "placements"} | {"api_keys", "uploaded_files", "fine_tuning_jobs"}
)
HEAD = "0005"

# What lora-ops' Base.metadata.create_all made before it had migrations (SQLAlchemy's DDL).
LEGACY_SCHEMA = """
CREATE TABLE deploy_locks (
    customer VARCHAR(63) NOT NULL,
    holder VARCHAR(128) NOT NULL,
    acquired_at DATETIME NOT NULL,
    PRIMARY KEY (customer)
);
CREATE TABLE deployments (
    id INTEGER NOT NULL,
    customer VARCHAR(63) NOT NULL,
    version VARCHAR(32) NOT NULL,
    replica_url VARCHAR(512) NOT NULL,
    status VARCHAR(16) NOT NULL,
    triggered_by VARCHAR(128) NOT NULL,
    detail TEXT NOT NULL,
    started_at DATETIME NOT NULL,
    finished_at DATETIME,
    PRIMARY KEY (id)
);
CREATE INDEX ix_deployments_customer ON deployments (customer);
CREATE TABLE replicas (
    id INTEGER NOT NULL,
    url VARCHAR(512) NOT NULL,
    added_at DATETIME NOT NULL,
    PRIMARY KEY (id),
    UNIQUE (url)
);
"""

FLEET_ROWS = {
    "replicas": [
        {"id": 1, "url": "http://127.0.0.1:8101", "added_at": "2026-01-02 03:04:05.000006"},
        {"id": 2, "url": "http://127.0.0.1:8102", "added_at": "2026-01-02 03:04:06.000000"},
    ],
    "deployments": [
        {
            "id": 1,
            "customer": "acme",
            "version": "3",
            "replica_url": "http://127.0.0.1:8101",
            "status": "succeeded",
            "triggered_by": "cli",
            "detail": "",
            "started_at": "2026-01-02 04:00:00.000000",
            "finished_at": "2026-01-02 04:00:09.500000",
        },
        {
            "id": 2,
            "customer": "globex",
            "version": "1",
            "replica_url": "http://127.0.0.1:8102",
            "status": "failed",
            "triggered_by": "retrain",
            "detail": "smoke test answered 'x'",
            "started_at": "2026-01-03 05:00:00.000000",
            "finished_at": None,
        },
    ],
    "deploy_locks": [
        {"customer": "acme", "holder": "host:123:cli", "acquired_at": "2026-01-02 04:00:00.000000"}
    ],
}


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def revision_of(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def insert_fleet_rows(engine: Engine) -> None:
    with engine.begin() as connection:
        for table, rows in FLEET_ROWS.items():
            columns = ", ".join(rows[0])
            values = ", ".join(f":{name}" for name in rows[0])
            connection.execute(text(f"INSERT INTO {table} ({columns}) VALUES ({values})"), rows)


def assert_fleet_rows_kept(engine: Engine) -> None:
    with engine.connect() as connection:
        for table, rows in FLEET_ROWS.items():
            key = next(iter(rows[0]))
            found = connection.execute(text(f"SELECT * FROM {table} ORDER BY {key}"))
            # Only the columns the rows were written with: later revisions add others.
            kept = [{column: row._mapping[column] for column in rows[0]} for row in found]
            assert kept == rows, table


def migrate_to(engine: Engine, revision: str) -> None:
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)


def test_empty_database_goes_to_head_with_every_table(tmp_path: Path) -> None:
    engine = create_engine_for(sqlite_url(tmp_path / "state" / "new.db"))
    assert upgrade_database(engine) == ["0001", "0002", "0003", "0004", "0005"]
    assert tables(engine) == ALL_TABLES | {"alembic_version"}
    assert revision_of(engine) == head_revision() == HEAD


def test_a_second_upgrade_applies_nothing(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "db.sqlite")
    Database(url)
    engine = create_engine(url)
    assert upgrade_database(engine) == []
    assert database_revision(url) == (HEAD, HEAD)


def test_revision_of_a_missing_file_is_none_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    assert database_revision(sqlite_url(path)) == (None, HEAD)
    assert not path.exists()


def test_rows_at_0001_survive_the_upgrade_to_head(tmp_path: Path) -> None:
    engine = create_engine(sqlite_url(tmp_path / "old.db"))
    migrate_to(engine, "0001")
    assert tables(engine) == FLEET_TABLES | {"alembic_version"}
    insert_fleet_rows(engine)
    assert upgrade_database(engine) == ["0002", "0003", "0004", "0005"]
    assert_fleet_rows_kept(engine)
    assert {"customers", "placements"} <= tables(engine)
    assert revision_of(engine) == HEAD
    with engine.connect() as connection:  # replicas from before placement are in rotation
        states = connection.execute(text("SELECT state, base_sha256 FROM replicas")).all()
    assert states
    assert all(tuple(row) == ("active", None) for row in states)


def test_a_database_from_before_migrations_is_stamped_then_upgraded(tmp_path: Path) -> None:
    engine = create_engine(sqlite_url(tmp_path / "legacy.db"))
    with engine.begin() as connection:
        for statement in LEGACY_SCHEMA.split(";"):
            if statement.strip():
                connection.execute(text(statement))
    insert_fleet_rows(engine)
    assert upgrade_database(engine) == ["0002", "0003", "0004", "0005"]
    assert_fleet_rows_kept(engine)
    assert revision_of(engine) == HEAD
    assert_schema_matches_models(engine)


def test_the_schema_at_head_matches_the_models(tmp_path: Path) -> None:
    """Fails when a model in lora_ops/db/models.py changes without a migration."""
    engine = create_engine(sqlite_url(tmp_path / "head.db"))
    upgrade_database(engine)
    assert_schema_matches_models(engine)


def assert_schema_matches_models(engine: Engine) -> None:
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], "models and migrations differ; write a revision (see alembic.ini)"


def test_downgrade_to_0001_drops_customers_and_keeps_the_fleet(tmp_path: Path) -> None:
    engine = create_engine(sqlite_url(tmp_path / "down.db"))
    upgrade_database(engine)
    insert_fleet_rows(engine)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0001")
    assert tables(engine) == FLEET_TABLES | {"alembic_version"}
    assert_fleet_rows_kept(engine)


def test_a_database_from_a_newer_lora_ops_is_refused(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "newer.db")
    Database(url)
    with create_engine(url).begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(LoraOpsError, match="revision 0099, newer than this lora-ops knows"):
        Database(url)
    assert database_revision(url) == ("0099", HEAD)


def test_the_database_works_after_migrating(tmp_path: Path) -> None:
    db = Database(sqlite_url(tmp_path / "live.db"))
    with db.session() as session:
        session.add(Replica(url="http://127.0.0.1:8101"))
    with db.deploy_lock("acme", "test"), pytest.raises(DeployInProgress):
        db.deploy_lock("acme", "someone else").__enter__()
    assert db.replica_urls() == ["http://127.0.0.1:8101"]
    assert db.deployments() == []


def test_threads_opening_one_new_database_at_once_all_succeed(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "shared.db")
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def open_database() -> None:
        start.wait()
        try:
            Database(url).replica_urls()
        except BaseException as exc:  # reported below, a thread cannot raise into the test
            errors.append(exc)

    threads = [threading.Thread(target=open_database) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert database_revision(url) == (HEAD, HEAD)


OPEN_AT = """
import sys, time
from lora_ops.db import Database
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
Database(sys.argv[1]).replica_urls()
"""


def test_processes_opening_one_new_database_at_once_all_succeed(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "shared.db")
    # Each process waits for the same moment after its imports, so the migrations overlap.
    start_at = str(time.time() + 2)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT, url, start_at],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [process.communicate(timeout=120) for process in processes]
    for process, (_, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stderr
    assert database_revision(url) == (HEAD, HEAD)
    engine = create_engine(url)
    with engine.connect() as connection:
        versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    assert versions == [(HEAD,)]


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_databases_migrate_without_a_lock_file(url: str) -> None:
    db = Database(url)
    assert tables(db.engine) == ALL_TABLES | {"alembic_version"}
