"""The Alembic migrations are the schema: they reach head on open, match schema.py, and the
indexes that keep resolve O(log n) are there."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from lorafleet.registry import Registry
from lorafleet.registry.db import current_revision, head_revision
from lorafleet.registry.schema import metadata


def test_open_migrates_to_head_and_matches_schema(registry):
    with registry.engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, metadata)
    assert diff == [], diff


def test_resolve_lookups_are_index_backed(registry):
    inspector = sa.inspect(registry.engine)
    uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("adapters")}
    assert ("tenant", "username", "name") in uniques
    assert inspector.get_pk_constraint("revisions")["constrained_columns"] == ["adapter_id", "number"]
    assert inspector.get_pk_constraint("aliases")["constrained_columns"] == ["adapter_id", "name"]
    assert {tuple(i["column_names"]) for i in inspector.get_indexes("revisions")} >= {("digest",)}


def test_sqlite_query_plan_uses_indexes(sqlite_registry):
    with sqlite_registry.engine.connect() as conn:
        plan = " ".join(
            str(row[-1])
            for row in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT r.digest FROM adapters a JOIN aliases l ON l.adapter_id = a.id "
                "JOIN revisions r ON r.adapter_id = l.adapter_id AND r.number = l.number "
                "WHERE a.tenant = 't' AND a.username = 'u' AND a.name = 'a' AND l.name = 'live'"
            )
        )
    assert "SCAN" not in plan, plan


def test_reopen_is_a_noop(registry_url, blob_url):
    Registry(registry_url, blob_url).close()
    with Registry(registry_url, blob_url) as reg, reg.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_database_from_a_newer_lorafleet_is_refused(tmp_path):
    from lorafleet.registry import RegistryError

    url = f"sqlite:///{tmp_path / 'r.db'}"
    Registry(url, str(tmp_path / "b")).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    with pytest.raises(RegistryError, match="schema version '9999_future'.*newer lorafleet; upgrade lorafleet"):
        Registry(url, str(tmp_path / "b"))
