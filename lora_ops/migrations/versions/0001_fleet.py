"""fleet: replicas, deployments, deploy_locks

The schema lora-ops made with ``create_all`` before it had migrations; databases from then
are stamped with this revision instead of running it.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 01:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("url", sa.String(length=512), nullable=False),
        sa.Column("added_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("url"),
    )
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("customer", sa.String(length=63), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("replica_url", sa.String(length=512), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("triggered_by", sa.String(length=128), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_deployments_customer", "deployments", ["customer"], unique=False)
    op.create_table(
        "deploy_locks",
        sa.Column("customer", sa.String(length=63), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("acquired_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("customer"),
    )


def downgrade() -> None:
    op.drop_table("deploy_locks")
    op.drop_index("ix_deployments_customer", table_name="deployments")
    op.drop_table("deployments")
    op.drop_table("replicas")
