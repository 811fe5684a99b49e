"""Adapter stacks: an adapter may declare a parent adapter (organisation -> team -> person).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: a plain ALTER TABLE ADD COLUMN on both SQLite and PostgreSQL (no table rewrite).
    op.add_column("adapters", sa.Column("parent_ref", sa.String(191), nullable=True))
    op.create_index("ix_adapters_parent_ref", "adapters", ["parent_ref"])


def downgrade() -> None:
    op.drop_index("ix_adapters_parent_ref", table_name="adapters")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("parent_ref")
