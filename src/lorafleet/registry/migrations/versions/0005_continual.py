"""Continual learning: captured interactions, feedback, per-adapter memory settings and update schedules.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "interactions",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("response_id", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("username", sa.String(63), nullable=False),
        sa.Column("adapter", sa.String(63), nullable=False),
        sa.Column("revision", sa.Integer, nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_interactions"),
        sa.UniqueConstraint("response_id", name="uq_interactions_response_id"),
    )
    op.create_index("ix_interactions_tenant_username_id", "interactions", ["tenant", "username", "id"])
    op.create_table(
        "feedback",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("username", sa.String(63), nullable=False),
        sa.Column("adapter", sa.String(63), nullable=False),
        sa.Column("response_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("rating", sa.Integer, nullable=True),
        sa.Column("method", sa.String(8), nullable=True),
        sa.Column("record", sa.JSON, nullable=True),
        sa.Column("created_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_feedback"),
    )
    op.create_index("ix_feedback_tenant_username_adapter_id", "feedback", ["tenant", "username", "adapter", "id"])
    op.create_table(
        "schedules",
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("username", sa.String(63), nullable=False),
        sa.Column("adapter", sa.String(63), nullable=False),
        sa.Column("capture", sa.Boolean, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("policy", sa.JSON, nullable=False),
        sa.Column("watermark", sa.BigInteger, nullable=False),
        sa.Column("pending_job", sa.BigInteger, nullable=True),
        sa.Column("pending_watermark", sa.BigInteger, nullable=True),
        sa.Column("last_run_at", Time, nullable=True),
        sa.Column("last_result", sa.JSON, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "username", "adapter", name="pk_schedules"),
    )


def downgrade() -> None:
    op.drop_table("schedules")
    op.drop_index("ix_feedback_tenant_username_adapter_id", table_name="feedback")
    op.drop_table("feedback")
    op.drop_index("ix_interactions_tenant_username_id", table_name="interactions")
    op.drop_table("interactions")
