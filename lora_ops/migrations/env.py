"""Alembic's entry point: runs the revisions against lora-ops' service database.

lora_ops.db passes its open connection in ``config.attributes["connection"]``, so no second
engine is made. The ``alembic`` command line (``alembic -c alembic.ini ...``) gets an engine
from ``sqlalchemy.url`` when set, else from lora-ops' settings (``LORA_OPS_DATABASE_URL``).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection

from lora_ops.db import Base
from lora_ops.settings import get_settings

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().database_url


def run_on(connection: Connection) -> None:
    # Batch mode: SQLite cannot ALTER most things, so later revisions copy and swap tables.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as own_connection:
        run_on(own_connection)


def run_offline() -> None:
    """``alembic upgrade --sql``: print the SQL instead of running it."""
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        render_as_batch=True,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


# Only the command line configures logging: inside lora-ops the application owns it.
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_offline()
else:
    run_online()
