"""validation data: a customer may name a held-out file instead of a share of its data

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("customers") as customers:
        customers.add_column(sa.Column("validation_data_uri", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("customers") as customers:
        customers.drop_column("validation_data_uri")
