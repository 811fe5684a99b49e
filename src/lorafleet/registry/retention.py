"""Retention and garbage collection.

Phase 1 (revisions): for every adapter with more than ``keep_last`` revisions, delete the
revisions that are neither among its ``keep_last`` newest nor pointed at by an alias. Done in
batches of adapters, each batch in one write transaction holding the adapters' locks, so an
alias cannot move onto a revision while it is being deleted (and the aliases -> revisions
foreign key would refuse it anyway). Every deletion is written to the audit log.

Phase 2 (blobs): delete every blob that no blob-reference column references (revisions, and
other features' tables such as training jobs: see ``schema.blob_reference_columns``) —
including blobs left by a commit that crashed before its metadata transaction. Writers store a
blob *before* the transaction that references it, so the sweep must not race them:

* each chunk of candidates is checked and deleted while holding the lock every commit takes
  (the SQLite write lock / an exclusive PostgreSQL advisory lock that commits take shared), and
  a commit re-checks its blob under that lock and rewrites it if the sweep got there first;
* blobs younger than ``grace_s`` are kept (a writer that does not follow that protocol has
  ``grace_s`` to reference its blob; the local store refreshes a blob's mtime on every put).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

import sqlalchemy as sa

from . import db
from .errors import InvalidArgumentError
from .records import GcReport, utcnow
from .schema import adapters, aliases, audit, blob_reference_columns, revisions

if TYPE_CHECKING:
    from .registry import Registry

logger = logging.getLogger(__name__)

ADAPTER_BATCH = 500
BLOB_CHUNK = 500
DEFAULT_GRACE_S = 900.0


def run_gc(reg: Registry, *, keep_last: int, dry_run: bool, grace_s: float) -> GcReport:
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
        raise InvalidArgumentError(
            f"keep_last must be an integer >= 1 (the newest revision is always kept), got {keep_last!r}"
        )
    if not isinstance(grace_s, int | float) or grace_s < 0:
        raise InvalidArgumentError(f"grace_s must be a number of seconds >= 0, got {grace_s!r}")
    engine = reg.engine
    postgres = engine.dialect.name == "postgresql"

    with db.read_tx(engine) as conn:
        crowded = conn.execute(
            sa.select(revisions.c.adapter_id)
            .group_by(revisions.c.adapter_id)
            .having(sa.func.count() > keep_last)
            .order_by(revisions.c.adapter_id)
        ).scalars().all()

    deleted: list[tuple[str, int, str, int]] = []  # (ref, number, digest, size)
    for start in range(0, len(crowded), ADAPTER_BATCH):
        batch = crowded[start:start + ADAPTER_BATCH]
        tx = db.read_tx(engine) if dry_run else db.write_tx(engine)
        with tx as conn:
            deleted.extend(_retire_batch(conn, batch, keep_last, dry_run=dry_run, postgres=postgres))
    deleted.sort(key=lambda d: (d[0], d[1]))

    removed_temp = 0 if dry_run else reg.blobs.clean_temp(max(grace_s, 3600.0))
    present = sorted(set(reg.blobs.iter_digests()))
    cutoff = time.time() - grace_s
    doomed_blobs: list[str] = []
    freed = young = 0
    if dry_run:
        for digest in _unreferenced_after(engine, present, deleted):
            size, mtime = reg.blobs.stat(digest) or (0, 0.0)
            if mtime > cutoff:
                young += 1
                continue
            doomed_blobs.append(digest)
            freed += size
    else:
        for start in range(0, len(present), BLOB_CHUNK):
            chunk = present[start:start + BLOB_CHUNK]
            with db.write_tx(engine) as conn:
                if postgres:
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(db.GC_LOCK_KEY)))
                referenced = _referenced(conn, chunk)
                for digest in chunk:
                    if digest in referenced:
                        continue
                    size, mtime = reg.blobs.stat(digest) or (0, 0.0)
                    if mtime > cutoff:
                        young += 1
                        continue
                    reg.blobs.delete(digest)
                    doomed_blobs.append(digest)
                    freed += size

    with db.read_tx(engine) as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(revisions)).scalar_one()
    kept = total - len(deleted) if dry_run else total
    logger.info("gc%s: %d revisions and %d blobs (%d bytes) removed, %d young unreferenced blobs kept",
                " (dry run)" if dry_run else "", len(deleted), len(doomed_blobs), freed, young)
    return GcReport(
        dry_run=dry_run,
        keep_last=keep_last,
        deleted_revisions=[f"{ref}#{number}" for ref, number, _, _ in deleted],
        deleted_blobs=doomed_blobs,
        freed_bytes=freed,
        kept_revisions=kept,
        removed_temp_files=removed_temp,
        kept_young_blobs=young,
    )


def discard_unreferenced(reg: Registry, digests) -> list[str]:
    """Delete those of ``digests`` that no blob-reference column mentions, now (no grace period), under the lock
    commits take: for a writer's own blob it knows is garbage (a superseded job checkpoint, a commit refused
    because its adapter was forgotten). Returns the digests deleted."""
    digests = sorted({d for d in digests if d})
    if not digests:
        return []
    with db.write_tx(reg.engine) as conn:
        if reg.engine.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(db.GC_LOCK_KEY)))
        doomed = [d for d in digests if d not in _referenced(conn, digests)]
        for digest in doomed:
            reg.blobs.delete(digest)
    return doomed


def _referenced(conn, digests: list[str]) -> set[str]:
    """Which of ``digests`` any blob-reference column (revisions, jobs, ...) mentions."""
    found: set[str] = set()
    for col in blob_reference_columns():
        found.update(conn.execute(sa.select(col).where(col.in_(digests)).distinct()).scalars())
    return found


def _retire_batch(conn, batch: list[int], keep_last: int, *, dry_run: bool, postgres: bool):
    """Delete (or, dry run, list) the revisions of ``batch`` adapters that retention drops."""
    stmt = sa.select(adapters.c.id, adapters.c.tenant, adapters.c.username, adapters.c.name).where(
        adapters.c.id.in_(batch)
    ).order_by(adapters.c.id)
    if postgres and not dry_run:
        stmt = stmt.with_for_update()
    refs = {r.id: f"{r.tenant}/{r.username}/{r.name}" for r in conn.execute(stmt)}
    aliased = {
        (aid, number)
        for aid, number in conn.execute(
            sa.select(aliases.c.adapter_id, aliases.c.number).where(aliases.c.adapter_id.in_(batch))
        )
    }
    rows = conn.execute(
        sa.select(revisions.c.adapter_id, revisions.c.number, revisions.c.digest, revisions.c.size)
        .where(revisions.c.adapter_id.in_(batch))
        .order_by(revisions.c.adapter_id, revisions.c.number.desc())
    ).all()
    out = []
    rank: Counter[int] = Counter()
    doomed: dict[int, list[int]] = {}
    for aid, number, digest, size in rows:
        rank[aid] += 1
        if rank[aid] <= keep_last or (aid, number) in aliased:
            continue
        doomed.setdefault(aid, []).append(number)
        out.append((refs[aid], number, digest, size))
    if dry_run or not doomed:
        return out
    now = utcnow()
    for aid, numbers in doomed.items():
        conn.execute(sa.delete(revisions).where(revisions.c.adapter_id == aid, revisions.c.number.in_(numbers)))
    conn.execute(
        sa.insert(audit),
        [
            dict(adapter_id=aid, ref=refs[aid], action="revision.delete", alias=None, from_number=number,
                 to_number=None, actor="gc", reason=f"retention: keep_last={keep_last}", at=now)
            for aid, numbers in doomed.items()
            for number in sorted(numbers)
        ],
    )
    return out


def _unreferenced_after(engine, present: list[str], deleted: list[tuple[str, int, str, int]]) -> list[str]:
    """Dry run: blobs that would be unreferenced once ``deleted`` revisions are gone."""
    with db.read_tx(engine) as conn:
        rows = conn.execute(sa.select(revisions.c.digest, sa.func.count()).group_by(revisions.c.digest)).all()
        others: set[str] = set()
        for start in range(0, len(present), BLOB_CHUNK):
            chunk = present[start:start + BLOB_CHUNK]
            for col in blob_reference_columns():
                if col.table is not revisions:
                    others.update(conn.execute(sa.select(col).where(col.in_(chunk)).distinct()).scalars())
    refcount = Counter({digest: count for digest, count in rows})
    for _, _, digest, _ in deleted:
        refcount[digest] -= 1
    return [d for d in present if refcount.get(d, 0) <= 0 and d not in others]
