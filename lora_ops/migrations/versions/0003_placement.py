"""placement: replicas declare their base and state; customers are placed on replicas

A replica records the base model it serves (name and weights' sha256: adapters go only to
replicas of their base) and whether it is in rotation (``active``) or drained (``down``).
``placements`` holds the replicas each customer's production adapter lives on.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 05:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("replicas") as replicas:
        replicas.add_column(sa.Column("base", sa.String(length=512), nullable=True))
        replicas.add_column(sa.Column("base_sha256", sa.String(length=64), nullable=True))
        replicas.add_column(
            sa.Column("state", sa.String(length=16), nullable=False, server_default="active")
        )
        replicas.add_column(sa.Column("state_detail", sa.Text(), nullable=False, server_default=""))
        replicas.add_column(sa.Column("state_since", sa.DateTime(), nullable=True))
    op.create_table(
        "placements",
        sa.Column("customer", sa.String(length=63), nullable=False),
        sa.Column("replica_url", sa.String(length=512), nullable=False),
        sa.Column("base_sha256", sa.String(length=64), nullable=False),
        sa.Column("placed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("customer", "replica_url"),
    )
    op.create_index("ix_placements_replica_url", "placements", ["replica_url"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_placements_replica_url", table_name="placements")
    op.drop_table("placements")
    with op.batch_alter_table("replicas") as replicas:
        replicas.drop_column("state_since")
        replicas.drop_column("state_detail")
        replicas.drop_column("state")
        replicas.drop_column("base_sha256")
        replicas.drop_column("base")
