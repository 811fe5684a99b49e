"""Metadata schema (SQLAlchemy Core). The tables are created only by the Alembic migrations in
``migrations/versions``; this module mirrors them for queries, and a test checks the two agree.

::

    adapters (id, tenant, username, name, latest, creator, description, created_at, parent_ref)
        unique (tenant, username, name)                 -- resolve: O(log n)
        index (parent_ref)                              -- a stack's members (registry/stacks.py)
    revisions (adapter_id, number, digest, size, <provenance columns>, metrics, created_at)
        primary key (adapter_id, number); index (digest) -- gc reference checks
    aliases (adapter_id, name, number, updated_at)
        primary key (adapter_id, name); fk (adapter_id, number) -> revisions
    audit (id, adapter_id, ref, action, alias, from_number, to_number, actor, reason, at)
        index (adapter_id, id)                          -- append-only

Later features (training jobs, API keys, interactions/feedback/schedules) add tables with new migrations; the
naming convention below gives every constraint a stable name so migrations can refer to it.

Blob references: a column that holds the digest of a blob in the blob store must carry
``info={"blob_ref": True}``. ``Registry.gc`` keeps every blob such a column references and
deletes the rest (see ``blob_reference_columns``).
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

# On SQLite only INTEGER PRIMARY KEY aliases the rowid (compact and auto-incrementing).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonMap = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


class UTCDateTime(sa.TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive UTC text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect):  # noqa: D102
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect):  # noqa: D102
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


adapters = sa.Table(
    "adapters",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(63), nullable=False),
    sa.Column("username", sa.String(63), nullable=False),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("latest", sa.Integer, nullable=False, server_default="0"),
    sa.Column("creator", sa.String(255), nullable=False, server_default=""),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Migration 0004: the adapter's parent in a stack (``tenant/user/name``, same tenant), or NULL.
    sa.Column("parent_ref", sa.String(191), nullable=True),
    sa.UniqueConstraint("tenant", "username", "name"),
    sa.Index("ix_adapters_parent_ref", "parent_ref"),
)

revisions = sa.Table(
    "revisions",
    metadata,
    sa.Column("adapter_id", sa.BigInteger, sa.ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False, info={"blob_ref": True}),
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
    sa.Column("produced_at", UTCDateTime, nullable=True),
    sa.Column("metrics", JsonMap, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.PrimaryKeyConstraint("adapter_id", "number"),
    sa.Index("ix_revisions_digest", "digest"),
)

aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column("adapter_id", sa.BigInteger, nullable=False),
    sa.Column("name", sa.String(32), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.PrimaryKeyConstraint("adapter_id", "name"),
    sa.ForeignKeyConstraint(["adapter_id", "number"], ["revisions.adapter_id", "revisions.number"]),
    sa.Index("ix_aliases_adapter_id_number", "adapter_id", "number"),
    # Small rows keyed by their primary key: on SQLite store them in the PK b-tree itself, so
    # resolving an alias is one b-tree descent and the (adapter_id, number) index covers `name`.
    sqlite_with_rowid=False,
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("adapter_id", sa.BigInteger, nullable=False),
    sa.Column("ref", sa.String(191), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("alias", sa.String(32), nullable=True),
    sa.Column("from_number", sa.Integer, nullable=True),
    sa.Column("to_number", sa.Integer, nullable=True),
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Index("ix_audit_adapter_id_id", "adapter_id", "id"),
)

# Training jobs (migration 0002): a persisted queue; see lorafleet.training.jobs.
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("ref", sa.String(191), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("spec", JsonMap, nullable=False),
    sa.Column("config", JsonMap, nullable=False),
    sa.Column("dataset_digest", sa.String(64), nullable=False, info={"blob_ref": True}),
    sa.Column("example_count", sa.Integer, nullable=False),
    sa.Column("warm_start", sa.String(16), nullable=False),
    sa.Column("creator", sa.String(255), nullable=False),
    sa.Column("auto_promote", sa.Boolean, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=True),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Column("worker_id", sa.String(255), nullable=True),
    sa.Column("lease_until", UTCDateTime, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("total_steps", sa.Integer, nullable=False),
    sa.Column("loss", sa.Float, nullable=True),
    sa.Column("losses", sa.JSON, nullable=False),
    sa.Column("checkpoint_digest", sa.String(64), nullable=True, info={"blob_ref": True}),
    sa.Column("result_number", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("report", JsonMap, nullable=False),
    sa.Index("ix_jobs_state_id", "state", "id"),
    sa.Index("ix_jobs_ref_id", "ref", "id"),
)

# API keys (migration 0003): stored as sha256 of the secret; see lorafleet.api.keys.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("tenant", sa.String(63), nullable=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.UniqueConstraint("key_hash"),
)


# Continual learning (migration 0005): captured conversations, the user's feedback on them, and each adapter's
# memory settings (capture opt-in, update policy, the scheduler's watermark). See lorafleet.registry.memory.
interactions = sa.Table(
    "interactions",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("response_id", sa.String(64), nullable=False),
    sa.Column("tenant", sa.String(63), nullable=False),
    sa.Column("username", sa.String(63), nullable=False),
    sa.Column("adapter", sa.String(63), nullable=False),
    sa.Column("revision", sa.Integer, nullable=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("prompt", sa.JSON, nullable=False),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("response_id"),
    sa.Index("ix_interactions_tenant_username_id", "tenant", "username", "id"),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(63), nullable=False),
    sa.Column("username", sa.String(63), nullable=False),
    sa.Column("adapter", sa.String(63), nullable=False),
    sa.Column("response_id", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("rating", sa.Integer, nullable=True),
    sa.Column("method", sa.String(8), nullable=True),
    sa.Column("record", sa.JSON, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_feedback_tenant_username_adapter_id", "tenant", "username", "adapter", "id"),
)

schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("tenant", sa.String(63), nullable=False),
    sa.Column("username", sa.String(63), nullable=False),
    sa.Column("adapter", sa.String(63), nullable=False),
    sa.Column("capture", sa.Boolean, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("policy", sa.JSON, nullable=False),
    sa.Column("watermark", sa.BigInteger, nullable=False),
    sa.Column("pending_job", sa.BigInteger, nullable=True),
    sa.Column("pending_watermark", sa.BigInteger, nullable=True),
    sa.Column("last_run_at", UTCDateTime, nullable=True),
    sa.Column("last_result", sa.JSON, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.PrimaryKeyConstraint("tenant", "username", "adapter"),
)

# Commit keys (migration 0006): a revision remembered under (scope, key), written in the commit's own transaction.
# Scopes: ``job`` (key: the job id; a resumed job finds the revision it committed) and ``upload:<tenant>`` (key:
# the client's Idempotency-Key). The digest is not a blob reference: a key does not keep a blob alive.
commit_keys = sa.Table(
    "commit_keys",
    metadata,
    sa.Column("scope", sa.String(80), nullable=False),
    sa.Column("key", sa.String(255), nullable=False),
    sa.Column("adapter_id", sa.BigInteger, sa.ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.PrimaryKeyConstraint("scope", "key"),
    sa.Index("ix_commit_keys_adapter_id", "adapter_id"),
)


def blob_reference_columns() -> list[sa.Column]:
    """Every column marked ``info={"blob_ref": True}``: the digests gc must not delete."""
    return [col for table in metadata.sorted_tables for col in table.columns if col.info.get("blob_ref")]
