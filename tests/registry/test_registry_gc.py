"""Retention and garbage collection."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
from registry_helpers import REF, blob, prov

from lorafleet.registry import InvalidArgumentError, NotFoundError, retention
from lorafleet.registry.schema import revisions


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_gc_keeps_last_n_and_aliased_and_deletes_unreferenced_blobs(registry):
    for i in range(1, 7):
        registry.commit(REF, blob(f"rev {i}".encode()), prov(), aliases=["candidate"])
    registry.set_alias(REF, "live", 2)
    registry.set_alias(REF, "pinned", 1)
    registry.commit("acme/bob/other", blob(b"rev 3"), prov())  # shares a blob with REF#3
    orphan = b"uploaded, then the process crashed"
    registry.blobs.put(_digest(orphan), orphan)

    dry = registry.gc(keep_last=2, dry_run=True, grace_s=0)
    assert dry.dry_run and dry.deleted_revisions == [f"{REF}#3", f"{REF}#4"]
    assert sorted(dry.deleted_blobs) == sorted([_digest(blob(b"rev 4")), _digest(orphan)])
    assert len(registry.history(REF)) == 6 and registry.blobs.exists(_digest(orphan))  # dry run changed nothing

    report = registry.gc(keep_last=2, grace_s=0)
    assert not report.dry_run
    assert report.deleted_revisions == dry.deleted_revisions
    assert sorted(report.deleted_blobs) == sorted(dry.deleted_blobs)
    assert report.freed_bytes == len(blob(b"rev 4")) + len(orphan)
    assert report.kept_revisions == 5
    assert [r.number for r in registry.history(REF)] == [1, 2, 5, 6]
    assert registry.read_blob(_digest(blob(b"rev 3"))) == blob(b"rev 3")  # still referenced by acme/bob/other
    assert not registry.blobs.exists(_digest(blob(b"rev 4")))
    with pytest.raises(NotFoundError, match="#3 was removed by retention"):
        registry.resolve(f"{REF}#3")
    deletions = [e for e in registry.audit(REF) if e.action == "revision.delete"]
    assert sorted(e.from_number for e in deletions) == [3, 4] and {e.actor for e in deletions} == {"gc"}

    # numbers are never reused after gc
    assert registry.commit(REF, blob(b"rev 7"), prov()).number == 7
    assert registry.gc(keep_last=2).deleted_revisions == [f"{REF}#5"]


def test_gc_is_idempotent_and_validates(registry):
    registry.commit(REF, blob(b"only"), prov())
    assert registry.gc().deleted_revisions == [] and registry.gc().deleted_blobs == []
    assert registry.gc(keep_last=1).kept_revisions == 1
    with pytest.raises(InvalidArgumentError, match="keep_last must be an integer >= 1"):
        registry.gc(keep_last=0)


def test_rollback_skips_revisions_removed_by_gc(registry):
    for i in range(1, 5):
        registry.commit(REF, blob(f"r{i}".encode()), prov())
    for n in (1, 2, 3, 4):
        registry.set_alias(REF, "live", n)
    registry.gc(keep_last=1)  # 4 is live and newest; 1..3 go
    with pytest.raises(NotFoundError, match="no earlier live revision"):
        registry.rollback(REF)


def test_gc_removes_stale_temp_files_only(sqlite_registry):
    reg = sqlite_registry
    rev = reg.commit(REF, blob(b"x"), prov())
    folder = reg.blobs.path(rev.digest).parent
    stale, fresh = folder / ".tmp-stale", folder / ".tmp-fresh"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    report = reg.gc()
    assert report.removed_temp_files == 1
    assert not stale.exists() and fresh.exists()
    assert reg.read_blob(rev.digest) == blob(b"x")


def test_commit_rewrites_blob_swept_by_a_racing_gc(registry, monkeypatch):
    """If gc deletes a just-written (still unreferenced) blob before the commit's transaction,
    the commit notices under the lock and writes it again: no revision without its blob."""
    data = blob(b"racing")
    real_put = registry.blobs.put
    swept = {"done": False}

    def put_then_gc(digest, blob):
        wrote = real_put(digest, blob)
        if not swept["done"]:
            swept["done"] = True
            assert registry.gc(grace_s=0).deleted_blobs == [digest]  # the sweep runs in the gap
        return wrote

    monkeypatch.setattr(registry.blobs, "put", put_then_gc)
    rev = registry.commit(REF, data, prov())
    assert registry.read_blob(rev.digest) == data


def test_gc_keeps_young_unreferenced_blobs(registry):
    """A writer stores its blob before the row that references it; the grace period covers it."""
    young, old = b"just uploaded", b"long forgotten"
    registry.blobs.put(_digest(young), young)
    registry.blobs.put(_digest(old), old)
    if hasattr(registry.blobs, "root"):
        past = time.time() - 7200
        os.utime(registry.blobs.path(_digest(old)), (past, past))
    report = registry.gc(grace_s=600)
    assert report.deleted_blobs == [_digest(old)] and report.kept_young_blobs == 1
    assert registry.blobs.exists(_digest(young))
    assert registry.gc(grace_s=0).deleted_blobs == [_digest(young)]
    with pytest.raises(InvalidArgumentError, match="grace_s"):
        registry.gc(grace_s=-1)


def test_gc_keeps_blobs_referenced_by_other_tables(registry, monkeypatch):
    """Columns marked info={"blob_ref": True} (e.g. training jobs' dataset) protect their blobs."""
    import sqlalchemy as sa

    extra = sa.MetaData()
    uploads = sa.Table("test_uploads", extra, sa.Column("id", sa.Integer, primary_key=True),
                       sa.Column("digest", sa.String(64), info={"blob_ref": True}))
    extra.create_all(registry.engine)
    dataset = b"a training dataset"
    registry.blobs.put(_digest(dataset), dataset)
    with registry.engine.begin() as conn:
        conn.execute(sa.insert(uploads).values(id=1, digest=_digest(dataset)))
    monkeypatch.setattr(retention, "blob_reference_columns", lambda: [revisions.c.digest, uploads.c.digest])
    assert registry.gc(grace_s=0, dry_run=True).deleted_blobs == []
    assert registry.gc(grace_s=0).deleted_blobs == []
    assert registry.read_blob(_digest(dataset)) == dataset
    with registry.engine.begin() as conn:
        conn.execute(sa.delete(uploads))
    assert registry.gc(grace_s=0).deleted_blobs == [_digest(dataset)]
    extra.drop_all(registry.engine)


def test_shipped_blob_reference_columns_include_revisions():
    cols = {f"{c.table.name}.{c.name}" for c in retention.blob_reference_columns()}
    assert "revisions.digest" in cols
