"""The adapter registry: identity -> revisions -> blobs, with aliases and an audit log.

Commit protocol (why a crash never leaves a half-visible revision)::

    1. blob  = write the bytes to the content-addressed store (temp file, fsync, rename)
    2. BEGIN IMMEDIATE (SQLite) | BEGIN; SELECT ... FOR UPDATE on the adapter row (PostgreSQL)
    3.   number = adapters.latest + 1; insert revision; update latest; move aliases; audit rows
    4. COMMIT

A crash before 4 leaves at most an unreferenced blob, which ``gc`` deletes; after 4 the
revision is complete and its blob durable. Numbers come from the locked adapter row, so
concurrent writers get distinct, gapless numbers.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row

from lorafleet.config import Settings
from lorafleet.digest import digest_of

from . import db, faults, stacks
from .blobstore import BlobStore, open_blob_store
from .errors import (
    AlreadyExistsError,
    BaseMismatchError,
    CorruptBlobError,
    InvalidArgumentError,
    InvalidNameError,
    InvalidProvenanceError,
    KeyConflictError,
    NotFoundError,
)
from .names import CANDIDATE, LIVE, Address, check_alias, check_digest, check_segment, parse_address, parse_ref
from .records import AdapterInfo, AuditEntry, GcReport, Provenance, RevisionInfo, utcnow
from .retention import DEFAULT_GRACE_S, discard_unreferenced, run_gc
from .schema import adapters, aliases, audit, commit_keys, revisions

logger = logging.getLogger(__name__)

MAX_LIMIT = 10_000
_UNKNOWN = object()

# Prebuilt statements for the hot path (resolve): built once, compiled once per dialect. Each
# is ONE index-backed query: the unique (tenant, username, name) index finds the adapter, the
# aliases/revisions primary keys find the revision, and an outer join brings the names of all
# aliases pointing at it (one row per alias).
_ADAPTER_IS = (
    adapters.c.tenant == sa.bindparam("t"),
    adapters.c.username == sa.bindparam("u"),
    adapters.c.name == sa.bindparam("a"),
)
_TAGS = aliases.alias("tags")
_WITH_TAGS = sa.and_(_TAGS.c.adapter_id == revisions.c.adapter_id, _TAGS.c.number == revisions.c.number)
_POINTER = aliases.alias("pointer")
_BY_NUMBER = (
    sa.select(revisions, _TAGS.c.name.label("alias_name"), adapters.c.parent_ref)
    .select_from(adapters.join(revisions, revisions.c.adapter_id == adapters.c.id).outerjoin(_TAGS, _WITH_TAGS))
    .where(*_ADAPTER_IS, revisions.c.number == sa.bindparam("n"))
)
_BY_ALIAS = (
    sa.select(revisions, _TAGS.c.name.label("alias_name"), adapters.c.parent_ref)
    .select_from(
        adapters.join(_POINTER, _POINTER.c.adapter_id == adapters.c.id)
        .join(revisions, sa.and_(revisions.c.adapter_id == _POINTER.c.adapter_id,
                                 revisions.c.number == _POINTER.c.number))
        .outerjoin(_TAGS, _WITH_TAGS)
    )
    .where(*_ADAPTER_IS, _POINTER.c.name == sa.bindparam("alias"))
)


def _ref(row: Row) -> str:
    return f"{row.tenant}/{row.username}/{row.name}"


def _provenance(row: Row) -> Provenance:
    return Provenance(
        base_fingerprint=row.base_fingerprint,
        parent=row.parent,
        parent_digest=row.parent_digest,
        method=row.method,
        hyperparams=dict(row.hyperparams or {}),
        dataset_digest=row.dataset_digest,
        example_count=row.example_count,
        code_version=row.code_version,
        creator=row.creator,
        created_at=row.produced_at,
        metrics=dict(row.metrics or {}),
    )


def _revision(row: Row, ref: str, alias_names: Iterable[str]) -> RevisionInfo:
    return RevisionInfo(
        ref=ref,
        number=row.number,
        digest=row.digest,
        size=row.size,
        provenance=_provenance(row),
        aliases=sorted(alias_names),
        created_at=row.created_at,
    )


def _audit_entry(row: Row) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        ref=row.ref,
        action=row.action,
        alias=row.alias,
        from_number=row.from_number,
        to_number=row.to_number,
        actor=row.actor,
        reason=row.reason,
        at=row.at,
    )


def _check_text(value: object, what: str, max_len: int = 255) -> str:
    if not isinstance(value, str) or len(value) > max_len or "\x00" in value:
        raise InvalidArgumentError(f"{what} must be a string of at most {max_len} characters without NUL")
    return value


def encode_cursor(tenant: str, user: str, name: str) -> str:
    """The ``list_adapters`` cursor that continues after ``tenant/user/name`` (opaque to callers)."""
    raw = json.dumps([tenant, user, name], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        tenant, user, name = json.loads(raw)
        for part, what in ((tenant, "tenant"), (user, "user"), (name, "adapter")):
            check_segment(part, what)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InvalidArgumentError(
            f"invalid cursor {cursor!r}: pass the cursor returned by the previous list_adapters/ls call unchanged"
        ) from exc
    return tenant, user, name


class Registry:
    """Source of truth for adapters: identities, immutable revisions, aliases, audit, blobs.

    ``db_url`` defaults to ``$LORAFLEET_DB_URL`` or ``sqlite:///<data dir>/registry.db``;
    ``blob_url`` to ``$LORAFLEET_BLOB_URL`` or ``<data dir>/blobs`` (``s3://bucket/prefix``
    works through s3fs; ``blob_options`` are passed to fsspec). The schema is migrated to
    head on open. Thread-safe; open one per process (never share across ``fork``).
    """

    def __init__(self, db_url: str | None = None, blob_url: str | None = None, *,
                 blob_options: dict[str, Any] | None = None):
        if not db_url or not blob_url:
            settings = Settings.from_env()
            db_url = db_url or settings.registry_db_url
            blob_url = blob_url or settings.registry_blob_url
        self.db_url = db_url
        self.blob_url = blob_url
        self._engine = db.create_engine(db_url)
        self._postgres = self._engine.dialect.name == "postgresql"
        try:
            db.migrate(self._engine)
            self.blobs: BlobStore = open_blob_store(blob_url, blob_options)
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def open_default(cls, settings: Settings | None = None) -> Registry:
        """Open the registry of ``settings`` (default: from the environment: ``$LORAFLEET_DB_URL`` /
        ``$LORAFLEET_BLOB_URL`` / ``$LORAFLEET_HOME``)."""
        settings = settings or Settings.from_env()
        return cls(settings.registry_db_url, settings.registry_blob_url)

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        url = self._engine.url.render_as_string(hide_password=True)
        return f"Registry(db_url={url!r}, blob_url={self.blob_url!r})"

    # ------------------------------------------------------------------ helpers

    def _insert(self, table: sa.Table):
        return (postgresql.insert if self._postgres else sqlite.insert)(table)

    def _adapter_row(self, conn: Connection, tenant: str, user: str, name: str, *, lock: bool = False) -> Row | None:
        stmt = sa.select(adapters).where(
            adapters.c.tenant == tenant, adapters.c.username == user, adapters.c.name == name
        )
        if lock and self._postgres:
            stmt = stmt.with_for_update()
        return conn.execute(stmt).first()

    def _require_adapter(self, conn: Connection, ref: str, *, lock: bool = False) -> Row:
        tenant, user, name = parse_ref(ref)
        row = self._adapter_row(conn, tenant, user, name, lock=lock)
        if row is None:
            raise NotFoundError(f"adapter {ref!r} does not exist; create it with `lorafleet adapters create {ref}`")
        return row

    def _aliases_of_adapter(self, conn: Connection, adapter_ids: Sequence[int]) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {aid: {} for aid in adapter_ids}
        if adapter_ids:
            rows = conn.execute(
                sa.select(aliases.c.adapter_id, aliases.c.name, aliases.c.number)
                .where(aliases.c.adapter_id.in_(list(adapter_ids)))
                .order_by(aliases.c.adapter_id, aliases.c.name)
            )
            for aid, alias, number in rows:
                out[aid][alias] = number
        return out

    @staticmethod
    def _adapter_info(row: Row, alias_map: dict[str, int]) -> AdapterInfo:
        return AdapterInfo(
            tenant=row.tenant,
            user=row.username,
            name=row.name,
            ref=_ref(row),
            created_at=row.created_at,
            creator=row.creator,
            description=row.description,
            aliases=dict(alias_map),
            latest=row.latest or None,
            parent=row.parent_ref,
        )

    def _find_revision(self, conn: Connection, addr: Address) -> RevisionInfo:
        return self._find_revision_and_parent(conn, addr)[0]

    def _find_revision_and_parent(self, conn: Connection, addr: Address) -> tuple[RevisionInfo, str | None]:
        """The revision ``addr`` names and its adapter's stack parent (one index-backed query)."""
        params = {"t": addr.tenant, "u": addr.user, "a": addr.name}
        if addr.number is not None:
            rows = conn.execute(_BY_NUMBER, {**params, "n": addr.number}).all()
        else:
            rows = conn.execute(_BY_ALIAS, {**params, "alias": addr.alias}).all()
        if not rows:
            self._explain_missing(conn, addr)
        rev = _revision(rows[0], addr.ref, [r.alias_name for r in rows if r.alias_name is not None])
        return rev, rows[0].parent_ref

    def _explain_missing(self, conn: Connection, addr: Address) -> None:
        """Raise a NotFoundError that says which part of ``addr`` is missing and what to do."""
        arow = self._adapter_row(conn, addr.tenant, addr.user, addr.name)
        if arow is None:
            raise NotFoundError(f"adapter {addr.ref!r} does not exist (address {str(addr)!r})")
        if addr.number is not None:
            if addr.number > arow.latest:
                latest = f"the latest is #{arow.latest}" if arow.latest else "it has no revisions yet"
                raise NotFoundError(f"revision {addr} does not exist: {latest}")
            raise NotFoundError(
                f"revision {addr} was removed by retention (gc); its number is never reused. "
                f"See `lorafleet adapters history {addr.ref}` for the revisions that remain"
            )
        if addr.alias == LIVE:
            raise NotFoundError(
                f"adapter {addr.ref!r} has no live revision yet; promote one with "
                f"`lorafleet adapters alias {addr.ref} live N`, or address a revision as "
                f"{addr.ref}@{CANDIDATE} or {addr.ref}#N"
            )
        raise NotFoundError(
            f"alias {addr.alias!r} is not set on adapter {addr.ref!r}; set it with "
            f"`lorafleet adapters alias {addr.ref} {addr.alias} N`"
        )

    def _move_alias(self, conn: Connection, adapter_id: int, ref: str, alias: str, number: int | None, *,
                    action: str, actor: str, reason: str, current: object = _UNKNOWN) -> AuditEntry:
        """Point ``alias`` at ``number`` (None = delete) and append the audit row. Caller holds the lock."""
        if current is _UNKNOWN:
            current = conn.execute(
                sa.select(aliases.c.number).where(aliases.c.adapter_id == adapter_id, aliases.c.name == alias)
            ).scalar()
        now = utcnow()
        if number is None:
            conn.execute(sa.delete(aliases).where(aliases.c.adapter_id == adapter_id, aliases.c.name == alias))
        elif current is None:
            conn.execute(sa.insert(aliases).values(adapter_id=adapter_id, name=alias, number=number, updated_at=now))
        else:
            conn.execute(
                sa.update(aliases)
                .where(aliases.c.adapter_id == adapter_id, aliases.c.name == alias)
                .values(number=number, updated_at=now)
            )
        values = dict(adapter_id=adapter_id, ref=ref, action=action, alias=alias, from_number=current,
                      to_number=number, actor=actor, reason=reason, at=now)
        result = conn.execute(sa.insert(audit).values(**values))
        values.pop("adapter_id")
        return AuditEntry(id=result.inserted_primary_key[0], **values)

    def _require_revision(self, conn: Connection, arow: Row, number: object) -> int:
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise InvalidArgumentError(f"revision number must be a positive integer, got {number!r}")
        exists = conn.execute(
            sa.select(revisions.c.number).where(revisions.c.adapter_id == arow.id, revisions.c.number == number)
        ).first()
        if exists is None:
            self._explain_missing(conn, Address(arow.tenant, arow.username, arow.name, number=number))
        return number

    # ------------------------------------------------------------------ adapters

    def create_adapter(self, ref: str, *, creator: str = "cli", description: str = "",
                       exist_ok: bool = False, parent: str | None = None) -> AdapterInfo:
        """Create the identity ``tenant/user/adapter`` (no revisions yet).

        ``parent`` (``tenant/user/adapter`` of the same tenant) makes it the top level of a stack: it is served
        and trained on top of its parent's (and grandparent's) live revisions. See ``registry/stacks.py``.
        """
        tenant, user, name = parse_ref(ref)
        _check_text(creator, "creator")
        _check_text(description, "description", 10_000)
        with db.write_tx(self._engine) as conn:
            if parent is not None:
                parent = stacks.check_parent(self, conn, ref, parent, new=True)
            stmt = self._insert(adapters).values(
                tenant=tenant, username=user, name=name, latest=0, creator=creator, description=description,
                created_at=utcnow(), parent_ref=parent,
            ).on_conflict_do_nothing(index_elements=["tenant", "username", "name"]).returning(adapters.c.id)
            created = conn.execute(stmt).first() is not None
            if not created and not exist_ok:
                raise AlreadyExistsError(
                    f"adapter {ref!r} already exists; pick another name or pass exist_ok=True to reuse it"
                )
            row = self._adapter_row(conn, tenant, user, name)
            if not created and parent is not None and row.parent_ref != parent:
                raise AlreadyExistsError(
                    f"adapter {ref!r} already exists with parent {row.parent_ref!r}, not {parent!r}; change it with "
                    f"`lorafleet adapters parent {ref} {parent}`"
                )
            return self._adapter_info(row, self._aliases_of_adapter(conn, [row.id])[row.id])

    def get_adapter(self, ref: str) -> AdapterInfo:
        with db.read_tx(self._engine) as conn:
            row = self._require_adapter(conn, ref)
            return self._adapter_info(row, self._aliases_of_adapter(conn, [row.id])[row.id])

    def list_adapters(self, *, tenant: str | None = None, user: str | None = None, prefix: str | None = None,
                      limit: int = 100, cursor: str | None = None) -> tuple[list[AdapterInfo], str | None]:
        """Adapters ordered by ref, ``limit`` at a time; pass the returned cursor to get the next page.

        ``prefix`` matches the start of the ref (``"acme/"``, ``"acme/al"``, ``"acme/alice/as"``).
        Keyset pagination: each page is one index range scan, however deep.
        """
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
            raise InvalidArgumentError(f"limit must be an integer between 1 and {MAX_LIMIT}, got {limit!r}")
        where = []
        if tenant is not None:
            where.append(adapters.c.tenant == check_segment(tenant, "tenant"))
        if user is not None:
            where.append(adapters.c.username == check_segment(user, "user"))
        if prefix:
            where.extend(self._prefix_filter(prefix))
        if cursor:
            where.append(sa.tuple_(adapters.c.tenant, adapters.c.username, adapters.c.name) > decode_cursor(cursor))
        stmt = (
            sa.select(adapters)
            .where(*where)
            .order_by(adapters.c.tenant, adapters.c.username, adapters.c.name)
            .limit(limit + 1)
        )
        with db.read_tx(self._engine) as conn:
            rows = conn.execute(stmt).all()
            more = len(rows) > limit
            rows = rows[:limit]
            alias_maps = self._aliases_of_adapter(conn, [r.id for r in rows])
        items = [self._adapter_info(r, alias_maps[r.id]) for r in rows]
        next_cursor = encode_cursor(rows[-1].tenant, rows[-1].username, rows[-1].name) if more else None
        return items, next_cursor

    @staticmethod
    def _prefix_filter(prefix: str) -> list:
        if not isinstance(prefix, str):
            raise InvalidArgumentError(f"prefix must be a string, got {type(prefix).__name__}")
        parts = prefix.split("/")
        if len(parts) > 3:
            raise _bad_prefix(prefix)
        cols = (adapters.c.tenant, adapters.c.username, adapters.c.name)
        whats = ("tenant", "user", "adapter")
        out = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if last:
                if part:
                    if not all(c.isascii() and (c.isalnum() and not c.isupper() or c in "_.-") for c in part):
                        raise _bad_prefix(prefix)
                    out.append(cols[i].startswith(part, autoescape=True))
            else:
                out.append(cols[i] == check_segment(part, whats[i], prefix))
        return out

    # ------------------------------------------------------------------ revisions

    def commit(self, ref: str, blob: bytes, provenance: Provenance, *, creator: str = "cli",
               aliases: Sequence[str] = (CANDIDATE,), create: bool = True,
               key: tuple[str, str] | None = None) -> RevisionInfo:
        """Store ``blob`` as the next revision of ``ref`` and point ``aliases`` at it.

        ``blob`` must be a canonical adapter blob (:func:`lorafleet.adapters.to_bytes`): anything else (a raw
        PEFT safetensors file, arbitrary bytes) is refused with :class:`InvalidArgumentError` before anything is
        written, since a revision that cannot be decoded would fail every request that uses it. To bring in a
        PEFT folder, use :func:`lorafleet.registry.imports.import_adapters`.

        The blob is written first (content-addressed, deduplicated), then one transaction
        allocates the number and inserts the revision, alias moves and audit rows.

        ``key=(scope, key)`` makes the commit idempotent: the key is recorded with the revision in the same
        transaction; a commit under a key already recorded returns that revision (nothing new) when it was for
        the same adapter and digest, and raises :class:`KeyConflictError` otherwise. See :meth:`keyed`.
        """
        tenant, user, name = parse_ref(ref)
        if key is not None:
            key = _check_key(key)
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise InvalidArgumentError(f"blob must be bytes, got {type(blob).__name__}")
        if not isinstance(provenance, Provenance):
            raise InvalidProvenanceError(f"provenance must be a Provenance, got {type(provenance).__name__}")
        _check_text(creator, "creator")
        if isinstance(aliases, str):
            raise InvalidArgumentError(f"aliases must be a list of alias names, not the string {aliases!r}")
        alias_names = list(dict.fromkeys(check_alias(a) for a in aliases))
        now = utcnow()
        provenance = replace(
            provenance,
            creator=provenance.creator or creator,
            created_at=provenance.created_at or now,
        ).validate()
        # Our own copies: the returned record must not change if the caller mutates its dicts.
        provenance = replace(provenance, hyperparams=copy.deepcopy(provenance.hyperparams),
                             metrics=copy.deepcopy(provenance.metrics))
        blob = bytes(blob)
        check_adapter_blob(blob)
        digest = digest_of(blob)

        self.blobs.put(digest, blob)
        faults.checkpoint("after_blob")

        with db.write_tx(self._engine) as conn:
            if self._postgres:
                # Shared with other commits, exclusive with gc's blob sweep (see retention.py).
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock_shared(db.GC_LOCK_KEY)))
            arow = self._adapter_row(conn, tenant, user, name, lock=True)
            if arow is None:
                if not create:
                    raise NotFoundError(
                        f"adapter {ref!r} does not exist; create it first or commit with create=True"
                    )
                conn.execute(
                    self._insert(adapters)
                    .values(tenant=tenant, username=user, name=name, latest=0, creator=creator, description="",
                            created_at=utcnow())
                    .on_conflict_do_nothing(index_elements=["tenant", "username", "name"])
                )
                arow = self._adapter_row(conn, tenant, user, name, lock=True)
            now = utcnow()  # taken under the adapter lock: commit times increase with revision numbers
            if key is not None:
                done = self._keyed(conn, key)
                if done is not None:
                    same_or_conflict(key, done, ref, digest)
                    logger.info("commit key %s/%s: %s#%d already committed", *key, ref, done[1].number)
                    return done[1]
            # gc may have swept the blob between our write and this lock: if so, write it again.
            if not self.blobs.exists(digest):
                self.blobs.put(digest, blob)
            number = arow.latest + 1
            provenance = self._check_parent(conn, arow, number, provenance)
            conn.execute(
                sa.insert(revisions).values(
                    adapter_id=arow.id, number=number, digest=digest, size=len(blob),
                    base_fingerprint=provenance.base_fingerprint, parent=provenance.parent,
                    parent_digest=provenance.parent_digest, method=provenance.method,
                    hyperparams=provenance.hyperparams, dataset_digest=provenance.dataset_digest,
                    example_count=provenance.example_count, code_version=provenance.code_version,
                    creator=provenance.creator, produced_at=provenance.created_at, metrics=provenance.metrics,
                    created_at=now,
                )
            )
            conn.execute(sa.update(adapters).where(adapters.c.id == arow.id).values(latest=number))
            for alias in alias_names:
                self._move_alias(conn, arow.id, ref, alias, number, action="alias.set", actor=creator,
                                 reason=f"commit {ref}#{number}")
            if key is not None:  # same transaction as the revision: both exist, or neither
                conn.execute(sa.insert(commit_keys).values(scope=key[0], key=key[1], adapter_id=arow.id,
                                                           number=number, digest=digest, created_at=now))
            faults.checkpoint("before_db_commit")
        faults.checkpoint("after_db_commit")
        logger.info("committed %s#%d (%s, %d bytes)", ref, number, digest[:12], len(blob))
        return RevisionInfo(ref=ref, number=number, digest=digest, size=len(blob), provenance=provenance,
                            aliases=sorted(alias_names), created_at=now)

    def keyed(self, scope: str, key: str) -> tuple[str, RevisionInfo] | None:
        """The revision committed under ``(scope, key)``, as ``(ref, revision)``; ``None`` if none was (or its
        adapter was deleted). A revision gc removed since is reported with its recorded number and digest."""
        key = _check_key((scope, key))
        with db.read_tx(self._engine) as conn:
            return self._keyed(conn, key)

    def _keyed(self, conn: Connection, key: tuple[str, str]) -> tuple[str, RevisionInfo] | None:
        row = conn.execute(
            sa.select(commit_keys.c.number, commit_keys.c.digest, adapters.c.tenant, adapters.c.username,
                      adapters.c.name)
            .select_from(commit_keys.join(adapters, adapters.c.id == commit_keys.c.adapter_id))
            .where(commit_keys.c.scope == key[0], commit_keys.c.key == key[1])
        ).first()
        if row is None:
            return None
        ref = _ref(row)
        try:
            return ref, self._find_revision(conn, parse_address(f"{ref}#{row.number}"))
        except NotFoundError:  # removed by gc since: what the key recorded is still the answer
            return ref, RevisionInfo(ref=ref, number=row.number, digest=row.digest, size=0,
                                     provenance=Provenance(base_fingerprint=""), aliases=[], created_at=None)

    def _check_parent(self, conn: Connection, arow: Row, number: int, prov: Provenance) -> Provenance:
        if prov.parent is None:
            return prov
        ref = _ref(arow)
        if prov.parent >= number:
            raise InvalidProvenanceError(
                f"parent #{prov.parent} of the new revision {ref}#{number} must be an earlier revision"
            )
        prow = conn.execute(
            sa.select(revisions.c.digest, revisions.c.base_fingerprint).where(
                revisions.c.adapter_id == arow.id, revisions.c.number == prov.parent
            )
        ).first()
        if prow is None:
            if prov.parent_digest is None:
                raise InvalidProvenanceError(
                    f"parent {ref}#{prov.parent} was removed by gc; pass its parent_digest explicitly"
                )
            return prov
        if prov.parent_digest is not None and prov.parent_digest != prow.digest:
            raise InvalidProvenanceError(
                f"parent_digest {prov.parent_digest} does not match {ref}#{prov.parent}, whose digest is "
                f"{prow.digest}; fix the parent number or digest"
            )
        if prow.base_fingerprint != prov.base_fingerprint:
            raise BaseMismatchError(
                f"parent {ref}#{prov.parent} was trained for base {prow.base_fingerprint!r} but the new revision "
                f"claims base {prov.base_fingerprint!r}; a child must use its parent's base"
            )
        return replace(prov, parent_digest=prow.digest)

    def resolve(self, address: str) -> RevisionInfo:
        """``t/u/a`` (the live revision), ``t/u/a@alias`` or ``t/u/a#N`` -> the revision."""
        addr = parse_address(address)
        with db.read_once(self._engine) as conn:
            return self._find_revision(conn, addr)

    # ------------------------------------------------------------------ stacks (see stacks.py)

    def resolve_stack(self, address: str) -> list[RevisionInfo]:
        """The revisions a request for ``address`` applies, root first: each parent at its own ``live``."""
        return stacks.resolve_stack(self, address)

    def load_stack(self, address: str, *, base_fingerprint: str) -> list[tuple[RevisionInfo, bytes]]:
        """:meth:`resolve_stack` plus each level's verified bytes; every level must be for this base."""
        return stacks.load_stack(self, address, base_fingerprint=base_fingerprint)

    def set_parent(self, ref: str, parent: str | None, *, actor: str = "cli", reason: str = "") -> AuditEntry:
        """Put ``ref`` on top of ``parent`` (None: detach it), validated and audited."""
        return stacks.set_parent(self, ref, parent, actor=actor, reason=reason)

    def stack_members(self, ref: str) -> list[AdapterInfo]:
        """Every adapter stacked on ``ref`` (children, then grandchildren), ordered by ref."""
        return stacks.members(self, ref)

    def read_blob(self, digest: str) -> bytes:
        """The bytes of ``digest``, verified against it (Corrupt/MissingBlobError otherwise)."""
        return self.blobs.get(check_digest(digest))

    def load(self, address: str, *, base_fingerprint: str) -> tuple[RevisionInfo, bytes]:
        """Resolve ``address`` and return its verified bytes, refusing a revision made for another base."""
        rev = self.resolve(address)
        if rev.provenance.base_fingerprint != base_fingerprint:
            raise BaseMismatchError(
                f"{rev.address} (requested as {address!r}) was trained for base "
                f"{rev.provenance.base_fingerprint!r}, not the loaded base {base_fingerprint!r}; load it on its own "
                "base or retrain it for this one"
            )
        data = self.read_blob(rev.digest)
        if len(data) != rev.size:  # pragma: no cover - the digest check catches this first
            raise CorruptBlobError(f"blob {rev.digest} of {rev.address} has {len(data)} bytes, expected {rev.size}")
        return rev, data

    def history(self, ref: str) -> list[RevisionInfo]:
        """Every remaining revision of ``ref``, oldest first."""
        with db.read_tx(self._engine) as conn:
            arow = self._require_adapter(conn, ref)
            rows = conn.execute(
                sa.select(revisions).where(revisions.c.adapter_id == arow.id).order_by(revisions.c.number)
            ).all()
            by_number: dict[int, list[str]] = {}
            for alias, number in self._aliases_of_adapter(conn, [arow.id])[arow.id].items():
                by_number.setdefault(number, []).append(alias)
        return [_revision(r, _ref(arow), by_number.get(r.number, [])) for r in rows]

    def update_metrics(self, address: str, metrics: dict) -> RevisionInfo:
        """Merge ``metrics`` into the revision's metrics map (the only mutable part of a revision)."""
        addr = parse_address(address)
        if not isinstance(metrics, dict):
            raise InvalidArgumentError(f"metrics must be a dict, got {type(metrics).__name__}")
        Provenance(base_fingerprint="-", metrics=metrics).validate()
        with db.write_tx(self._engine) as conn:
            arow = self._adapter_row(conn, addr.tenant, addr.user, addr.name, lock=True)
            if arow is None:
                self._explain_missing(conn, addr)
            rev = self._find_revision(conn, addr)
            merged = {**rev.provenance.metrics, **metrics}
            conn.execute(
                sa.update(revisions)
                .where(revisions.c.adapter_id == arow.id, revisions.c.number == rev.number)
                .values(metrics=merged)
            )
            return replace(rev, provenance=replace(rev.provenance, metrics=merged))

    # ------------------------------------------------------------------ aliases

    def set_alias(self, ref: str, alias: str, number: int, *, actor: str = "cli", reason: str = "") -> AuditEntry:
        """Atomically point ``alias`` at revision ``number`` and record who/when/from/to/why."""
        parse_ref(ref)
        check_alias(alias)
        _check_text(actor, "actor")
        _check_text(reason, "reason", 10_000)
        with db.write_tx(self._engine) as conn:
            arow = self._require_adapter(conn, ref, lock=True)
            self._require_revision(conn, arow, number)
            return self._move_alias(conn, arow.id, ref, alias, number, action="alias.set", actor=actor,
                                    reason=reason)

    def delete_alias(self, ref: str, alias: str, *, actor: str = "cli", reason: str = "") -> AuditEntry:
        """Remove ``alias`` from ``ref`` (recorded in the audit log)."""
        parse_ref(ref)
        check_alias(alias)
        _check_text(actor, "actor")
        _check_text(reason, "reason", 10_000)
        with db.write_tx(self._engine) as conn:
            arow = self._require_adapter(conn, ref, lock=True)
            current = conn.execute(
                sa.select(aliases.c.number).where(aliases.c.adapter_id == arow.id, aliases.c.name == alias)
            ).scalar()
            if current is None:
                raise NotFoundError(f"alias {alias!r} is not set on adapter {ref!r}; nothing to delete")
            return self._move_alias(conn, arow.id, ref, alias, None, action="alias.delete", actor=actor,
                                    reason=reason, current=current)

    def rollback(self, ref: str, *, to: int | None = None, actor: str = "cli", reason: str = "") -> AuditEntry:
        """Move ``live`` back to the previous live revision (from the audit log), or to revision ``to``.

        Rollbacks stack: live 1 -> 2 -> 3, then rollback, rollback gives 2, then 1. Revisions
        that were removed since are skipped.
        """
        parse_ref(ref)
        _check_text(actor, "actor")
        _check_text(reason, "reason", 10_000)
        with db.write_tx(self._engine) as conn:
            arow = self._require_adapter(conn, ref, lock=True)
            current = conn.execute(
                sa.select(aliases.c.number).where(aliases.c.adapter_id == arow.id, aliases.c.name == LIVE)
            ).scalar()
            if to is not None:
                target = self._require_revision(conn, arow, to)
            else:
                target = self._previous_live(conn, arow, current)
            return self._move_alias(conn, arow.id, ref, LIVE, target, action="rollback", actor=actor,
                                    reason=reason, current=current)

    def _previous_live(self, conn: Connection, arow: Row, current: int | None) -> int:
        moves = conn.execute(
            sa.select(audit.c.action, audit.c.to_number)
            .where(audit.c.adapter_id == arow.id, audit.c.alias == LIVE)
            .order_by(audit.c.id)
        ).all()
        stack = live_stack(moves)
        if not stack or stack[-1] != current:
            stack.append(current)
        earlier = [n for n in reversed(stack[:-1]) if n is not None and n != current]
        if earlier:
            existing = set(
                conn.execute(
                    sa.select(revisions.c.number).where(
                        revisions.c.adapter_id == arow.id, revisions.c.number.in_(set(earlier))
                    )
                ).scalars()
            )
            for number in earlier:
                if number in existing:
                    return number
        ref = _ref(arow)
        raise NotFoundError(
            f"adapter {ref!r} has no earlier live revision to roll back to; name one with "
            f"`lorafleet adapters rollback {ref} --to N`"
        )

    def audit(self, ref: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """The newest ``limit`` audit entries (of ``ref``, or of every adapter), newest first."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
            raise InvalidArgumentError(f"limit must be an integer between 1 and {MAX_LIMIT}, got {limit!r}")
        stmt = sa.select(audit).order_by(audit.c.id.desc()).limit(limit)
        with db.read_tx(self._engine) as conn:
            if ref is not None:
                arow = self._require_adapter(conn, ref)
                stmt = stmt.where(audit.c.adapter_id == arow.id)
            return [_audit_entry(r) for r in conn.execute(stmt)]

    # ------------------------------------------------------------------ retention

    def discard_blobs(self, digests) -> list[str]:
        """Delete those of ``digests`` nothing references, now (see ``retention.discard_unreferenced``)."""
        return discard_unreferenced(self, digests)

    def gc(self, *, keep_last: int = 10, dry_run: bool = False, grace_s: float = DEFAULT_GRACE_S) -> GcReport:
        """Keep the last ``keep_last`` revisions of every adapter plus every aliased one; delete the
        other revisions, then every unreferenced blob older than ``grace_s`` seconds (and stale
        temp files). See ``retention.py``."""
        return run_gc(self, keep_last=keep_last, dry_run=dry_run, grace_s=grace_s)


def _check_key(key) -> tuple[str, str]:
    if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
        raise InvalidArgumentError(f"a commit key is a (scope, key) pair of strings, got {key!r}")
    scope, value = key
    if not 1 <= len(scope) <= 80 or not 1 <= len(value) <= 255 or not value.isprintable() or not value.isascii():
        raise InvalidArgumentError("a commit key must be 1-255 printable ASCII characters (scope 1-80), got "
                                   f"{value[:40]!r}")
    return scope, value


def same_or_conflict(key: tuple[str, str], done: tuple[str, RevisionInfo], ref: str, digest: str) -> None:
    done_ref, rev = done
    if done_ref != ref or rev.digest != digest:
        raise KeyConflictError(
            f"key {key[1]!r} was already used for {done_ref}#{rev.number} (digest {rev.digest[:12]}…); this "
            f"request is {ref} with digest {digest[:12]}…: a retry must send the same content, a new upload a new key"
        )


def check_adapter_blob(blob: bytes) -> None:
    """Refuse bytes that are not a canonical adapter blob (they would fail every load later)."""
    from lorafleet.adapters.errors import AdapterError  # noqa: PLC0415 - defers torch
    from lorafleet.adapters.peft_io import decode_blob  # noqa: PLC0415 - defers torch

    try:
        decode_blob(blob)
    except AdapterError as exc:
        raise InvalidArgumentError(
            f"blob is not a canonical lorafleet adapter blob ({exc}); write it with lorafleet.adapters.to_bytes, "
            "or import a PEFT folder with `lorafleet adapters import`"
        ) from None


def live_stack(moves: Iterable[tuple[str, int | None]]) -> list[int | None]:
    """Replay ``(action, to_number)`` moves of ``live`` into the stack of live values.

    A set pushes; a rollback to a value already on the stack pops back to it (so repeated
    rollbacks keep walking back), otherwise it pushes; a delete pushes None.
    """
    stack: list[int | None] = []
    for action, to_number in moves:
        if action == "rollback" and to_number in stack:
            del stack[len(stack) - 1 - stack[::-1].index(to_number) + 1:]
        elif not stack or stack[-1] != to_number:
            stack.append(to_number)
    return stack


def _bad_prefix(prefix: str) -> InvalidNameError:
    return InvalidNameError(
        f"invalid prefix {prefix!r}: use the start of a ref such as 'acme/', 'acme/al' or 'acme/alice/as' "
        "(lowercase a-z, 0-9, '_', '.', '-')"
    )
