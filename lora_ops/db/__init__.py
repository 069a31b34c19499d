"""The service database (SQLAlchemy 2): replicas and placements, deployments, deploy locks
and customers.

SQLite by default; any SQLAlchemy URL (Postgres) works. The one home of SQLAlchemy and of
its migrations (Alembic, in ``lora_ops/migrations``): opening a Database first brings its
schema to the newest revision, so a database made by any older lora-ops keeps its rows.
``models`` holds the tables, ``schema`` the revisions, ``database`` the queries.
"""

from lora_ops.db.database import Database, DeployInProgress, RecordExists
from lora_ops.db.models import (
    ACTIVE,
    DOWN,
    Base,
    Customer,
    DeployLock,
    Deployment,
    Placement,
    Replica,
    utcnow,
)
from lora_ops.db.schema import (
    alembic_config,
    create_engine_for,
    current_revision,
    database_revision,
    head_revision,
    sqlite_file,
    upgrade_database,
)

__all__ = [
    "ACTIVE",
    "DOWN",
    "Base",
    "Customer",
    "Database",
    "DeployInProgress",
    "DeployLock",
    "Deployment",
    "Placement",
    "RecordExists",
    "Replica",
    "alembic_config",
    "create_engine_for",
    "current_revision",
    "database_revision",
    "head_revision",
    "sqlite_file",
    "upgrade_database",
    "utcnow",
]
