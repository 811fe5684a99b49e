"""Training jobs: the persisted queue of lorafleet.training.jobs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonMap = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("ref", sa.String(191), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("spec", JsonMap, nullable=False),
        sa.Column("config", JsonMap, nullable=False),
        sa.Column("dataset_digest", sa.String(64), nullable=False),
        sa.Column("example_count", sa.Integer, nullable=False),
        sa.Column("warm_start", sa.String(16), nullable=False),
        sa.Column("creator", sa.String(255), nullable=False),
        sa.Column("auto_promote", sa.Boolean, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.Column("started_at", Time, nullable=True),
        sa.Column("finished_at", Time, nullable=True),
        sa.Column("worker_id", sa.String(255), nullable=True),
        sa.Column("lease_until", Time, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("total_steps", sa.Integer, nullable=False),
        sa.Column("loss", sa.Float, nullable=True),
        sa.Column("losses", sa.JSON, nullable=False),
        sa.Column("checkpoint_digest", sa.String(64), nullable=True),
        sa.Column("result_number", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("report", JsonMap, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_state_id", "jobs", ["state", "id"])
    op.create_index("ix_jobs_ref_id", "jobs", ["ref", "id"])


def downgrade() -> None:
    op.drop_table("jobs")
