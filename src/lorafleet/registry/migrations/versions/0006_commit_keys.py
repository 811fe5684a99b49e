"""Commit keys: a revision remembered under a (scope, key) written in the commit's own transaction — a training
job's revision (scope ``job``) and an upload's ``Idempotency-Key`` (scope ``upload:<tenant>``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "commit_keys",
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("adapter_id", sa.BigInteger, nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("scope", "key", name="pk_commit_keys"),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], name="fk_commit_keys_adapter_id_adapters",
                                ondelete="CASCADE"),
    )
    op.create_index("ix_commit_keys_adapter_id", "commit_keys", ["adapter_id"])


def downgrade() -> None:
    op.drop_index("ix_commit_keys_adapter_id", table_name="commit_keys")
    op.drop_table("commit_keys")
