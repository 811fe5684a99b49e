"""Engine setup, write transactions and schema migrations for the registry database.

SQLite (embedded default): WAL journal (readers never block the writer), ``synchronous=FULL``
(an acknowledged commit survives power loss), ``foreign_keys=ON`` and a busy timeout. The
pysqlite driver's own transaction handling is switched off so that we emit ``BEGIN`` ourselves:
every write transaction starts with ``BEGIN IMMEDIATE``, which takes the single write lock up
front (waiting up to the busy timeout) instead of failing later on a read-to-write upgrade.

PostgreSQL (``postgresql+psycopg://...``): READ COMMITTED transactions; writers serialise per
adapter with ``SELECT ... FOR UPDATE`` on the adapter row.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from .errors import BusyError, RegistryError, StorageFullError

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
# pg_advisory_xact_lock keys (arbitrary constants, "lfmg"/"lfgc" in ASCII).
MIGRATION_LOCK_KEY = 0x6C666D67
GC_LOCK_KEY = 0x6C666763

_BEGIN_KEY = "lorafleet_begin"


def create_engine(url: str) -> Engine:
    """Create an engine for ``url`` with the registry's connection settings."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise RegistryError(
            f"invalid database URL {url!r}: use sqlite:///path/registry.db or postgresql+psycopg://user@host/db"
        ) from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed)
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            return sa.create_engine(parsed, pool_pre_ping=True)
        except ModuleNotFoundError as exc:
            raise RegistryError(
                "PostgreSQL support needs psycopg 3: pip install 'lorafleet[postgres]'"
            ) from exc
    raise RegistryError(f"unsupported database {backend!r} in {url!r}: use sqlite:///... or postgresql+psycopg://...")


def _sqlite_engine(url: sa.URL) -> Engine:
    database = url.database or ""
    memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if not memory:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict = {}
    if memory:
        # One shared connection, or every checkout would see a different empty database.
        kwargs = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    engine = sa.create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # pragma: no cover - exercised by every test
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see module docstring)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not memory:
            mode = cur.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning("SQLite database %s is not in WAL mode (got %s); is it on a network drive?",
                               database, mode)
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        # Deleted rows are overwritten with zeros, not left in free pages: a forgotten user's data (or a trimmed
        # interaction) is not recoverable from the file. The WAL is truncated after a forget (truncate_wal).
        cur.execute("PRAGMA secure_delete=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # pragma: no cover - exercised by every test
        mode = conn.info.pop(_BEGIN_KEY, "DEFERRED")
        if mode is not None:  # None: a single-statement read, atomic on its own (see read_once)
            conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


@contextlib.contextmanager
def write_tx(engine: Engine) -> Iterator[Connection]:
    """A write transaction: ``BEGIN IMMEDIATE`` on SQLite, a plain transaction on PostgreSQL.

    Database errors that mean "disk full" or "locked too long" become registry errors.
    """
    with translate_db_errors(engine), engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.info[_BEGIN_KEY] = "IMMEDIATE"
        with conn.begin():
            yield conn


def truncate_wal(engine: Engine) -> None:
    """SQLite: copy the WAL into the database and truncate it to zero bytes (it would otherwise keep the old
    versions of pages a deletion just rewrote). Waits for readers (busy timeout). No-op on PostgreSQL."""
    if engine.dialect.name != "sqlite":
        return
    with translate_db_errors(engine), engine.connect() as conn:
        conn.info[_BEGIN_KEY] = None
        try:
            busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.info.pop(_BEGIN_KEY, None)
    if busy and busy[0]:
        logger.warning("the WAL of %s could not be truncated (a reader held it); it is on the next checkpoint",
                       engine.url.render_as_string(hide_password=True))


@contextlib.contextmanager
def read_tx(engine: Engine) -> Iterator[Connection]:
    """A read transaction (one consistent snapshot for several queries)."""
    with translate_db_errors(engine), engine.connect() as conn, conn.begin():
        yield conn


@contextlib.contextmanager
def read_once(engine: Engine) -> Iterator[Connection]:
    """A connection for reads that need no multi-statement snapshot (each SELECT is atomic on
    its own). Skips the BEGIN/COMMIT round trips: the hot path of ``resolve``."""
    with translate_db_errors(engine), engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.info[_BEGIN_KEY] = None
            try:
                yield conn
            finally:
                conn.info.pop(_BEGIN_KEY, None)
        else:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")


@contextlib.contextmanager
def translate_db_errors(engine: Engine) -> Iterator[None]:
    try:
        yield
    except sa.exc.OperationalError as exc:
        raise _translate(engine, exc) from exc
    except sa.exc.DBAPIError as exc:
        translated = _translate(engine, exc)
        if translated is None:
            raise
        raise translated from exc


def _translate(engine: Engine, exc: sa.exc.DBAPIError) -> Exception | None:
    where = engine.url.render_as_string(hide_password=True)
    orig = exc.orig
    code = getattr(orig, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(orig):
        return StorageFullError(
            f"the registry database {where} is full (disk or size limit); free space, then retry — "
            "nothing of the failed operation was made visible"
        )
    if code == sqlite3.SQLITE_BUSY or "database is locked" in str(orig):
        return BusyError(
            f"the registry database {where} stayed locked by another writer for more than "
            f"{BUSY_TIMEOUT_MS // 1000} s; retry, and check for a stuck process holding it"
        )
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate == "53100":  # disk_full
        return StorageFullError(
            f"the PostgreSQL server behind {where} is out of disk space; free space, then retry"
        )
    if isinstance(exc, sa.exc.OperationalError):
        return RegistryError(f"database error on {where}: {str(orig).strip().splitlines()[0]}")
    return None


def migrations_dir() -> Path:
    return Path(str(resources.files("lorafleet.registry") / "migrations"))


def _alembic_config(conn: Connection | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(migrations_dir() / "versions"))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


@functools.cache
def head_revision() -> str:
    """The newest migration shipped with this version of lorafleet."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, "no registry migrations found; is the package installed with its data files?"
    return head


def current_revision(conn: Connection) -> str | None:
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: Engine) -> None:
    """Upgrade the schema to head, safely under concurrent openers.

    The fast path (already at head) is one read. Otherwise the upgrade runs inside one write
    transaction that holds the migration lock: the SQLite write lock (``BEGIN IMMEDIATE``) or a
    PostgreSQL advisory lock, so two processes opening a fresh database never both migrate.
    """
    from alembic import command

    head = head_revision()
    with read_tx(engine) as conn:
        if current_revision(conn) == head:
            return
    with write_tx(engine) as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
        current = current_revision(conn)
        if current == head:
            return
        if current is not None and not _known_revision(current):
            where = engine.url.render_as_string(hide_password=True)
            raise RegistryError(
                f"the registry database {where} has schema version {current!r}, which this lorafleet does not "
                f"know (its newest is {head!r}): it was migrated by a newer lorafleet; upgrade lorafleet"
            )
        logger.info("migrating registry schema %s -> %s", current, head)
        command.upgrade(_alembic_config(conn), "head")


def _known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory.from_config(_alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False
