"""Initial registry schema: adapters, revisions, aliases, audit.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonMap = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("username", sa.String(63), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("latest", sa.Integer, nullable=False, server_default="0"),
        sa.Column("creator", sa.String(255), nullable=False, server_default=""),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_adapters"),
        sa.UniqueConstraint("tenant", "username", "name", name="uq_adapters_tenant_username_name"),
    )
    op.create_table(
        "revisions",
        sa.Column("adapter_id", sa.BigInteger, nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("base_fingerprint", sa.String(255), nullable=False),
        sa.Column("parent", sa.Integer, nullable=True),
        sa.Column("parent_digest", sa.String(128), nullable=True),
        sa.Column("method", sa.String(255), nullable=False),
        sa.Column("hyperparams", JsonMap, nullable=False),
        sa.Column("dataset_digest", sa.String(128), nullable=True),
        sa.Column("example_count", sa.BigInteger, nullable=True),
        sa.Column("code_version", sa.String(255), nullable=False),
        sa.Column("creator", sa.String(255), nullable=False),
        sa.Column("produced_at", Time, nullable=True),
        sa.Column("metrics", JsonMap, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("adapter_id", "number", name="pk_revisions"),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name="fk_revisions_adapter_id_adapters", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_revisions_digest", "revisions", ["digest"])
    op.create_table(
        "aliases",
        sa.Column("adapter_id", sa.BigInteger, nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("adapter_id", "name", name="pk_aliases"),
        sa.ForeignKeyConstraint(
            ["adapter_id", "number"],
            ["revisions.adapter_id", "revisions.number"],
            name="fk_aliases_adapter_id_number_revisions",
        ),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_aliases_adapter_id_number", "aliases", ["adapter_id", "number"])
    op.create_table(
        "audit",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("adapter_id", sa.BigInteger, nullable=False),
        sa.Column("ref", sa.String(191), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("alias", sa.String(32), nullable=True),
        sa.Column("from_number", sa.Integer, nullable=True),
        sa.Column("to_number", sa.Integer, nullable=True),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit"),
    )
    op.create_index("ix_audit_adapter_id_id", "audit", ["adapter_id", "id"])


def downgrade() -> None:
    op.drop_table("audit")
    op.drop_table("aliases")
    op.drop_table("revisions")
    op.drop_table("adapters")
