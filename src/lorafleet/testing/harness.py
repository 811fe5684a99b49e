"""What the dashboard's browser tests and benchmark share: a real server on loopback, a fleet seeded in bulk,
and headless Chromium (Debian's ``chromium`` package, driven by Playwright; never a downloaded browser)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import sqlalchemy as sa
import uvicorn

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.registry import Provenance
from lorafleet.registry import db as regdb
from lorafleet.registry.records import default_code_version
from lorafleet.registry.schema import adapters, aliases, revisions
from lorafleet.testing.pgtest import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class LoopbackServer:
    """``create_app(service)`` under uvicorn in a thread on 127.0.0.1 (a real HTTP server, not ASGI in-process)."""

    def __init__(self, service, *, startup_timeout_s: float = 30.0) -> None:
        from lorafleet.api.app import create_app  # noqa: PLC0415 - defers fastapi

        self.service = service
        self.app = create_app(service)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="lorafleet-loopback")

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def launch_chromium(playwright):
    """Headless Chromium from the system package, with the flags that keep it off the network."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


A_COLS = ("id", "tenant", "username", "name", "latest", "creator", "description", "created_at")
R_COLS = ("adapter_id", "number", "digest", "size", "base_fingerprint", "method", "hyperparams", "code_version",
          "creator", "produced_at", "metrics", "created_at")
L_COLS = ("adapter_id", "name", "number", "updated_at")


def _insert_many(conn, table, cols: tuple[str, ...], rows: list[tuple]) -> None:
    """Bulk insert; on SQLite straight through the driver's executemany (typed Core inserts are ~10x slower)."""
    if conn.dialect.name == "sqlite":
        sql = f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        conn.exec_driver_sql(sql, rows)
    else:
        conn.execute(table.insert(), [dict(zip(cols, r, strict=True)) for r in rows])


def bulk_seed(registry, n: int, *, digest: str, size: int, base_fingerprint: str, users_per_tenant: int = 10_000,
              adapter_name: str = "style", batch: int = 50_000, progress=None) -> int:
    """Insert ``n`` identities ``tNNNN/uNNNNNN/<adapter_name>``, each with revision 1 (blob ``digest``) and a
    ``live`` alias, as bulk SQL in the registry's schema (not ``n`` commits). Returns the number inserted.

    Every revision points at the same existing blob, so each seeded adapter's page and chat route work.
    """
    if n < 0 or users_per_tenant < 1:
        raise ValueError("n must be >= 0 and users_per_tenant >= 1")
    sqlite = registry.engine.dialect.name == "sqlite"
    now = datetime.now(UTC)
    # SQLite stores a naive UTC text timestamp and JSON as text; other databases take the typed values.
    ts = now.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds") if sqlite else now
    empty = "{}" if sqlite else {}
    code_version = default_code_version()
    with regdb.write_tx(registry.engine) as conn:
        next_id = (conn.execute(sa.select(sa.func.max(adapters.c.id))).scalar() or 0) + 1
    done = 0
    while done < n:
        k = min(batch, n - done)
        first = next_id + done
        rows_a = [(first + j, f"t{(done + j) // users_per_tenant:04d}", f"u{(done + j) % users_per_tenant:06d}",
                   adapter_name, 1, "seed", "", ts) for j in range(k)]
        rows_r = [(first + j, 1, digest, size, base_fingerprint, "seed", empty, code_version, "seed", ts, empty, ts)
                  for j in range(k)]
        rows_l = [(first + j, "live", 1, ts) for j in range(k)]
        with regdb.write_tx(registry.engine) as conn:
            _insert_many(conn, adapters, A_COLS, rows_a)
            _insert_many(conn, revisions, R_COLS, rows_r)
            _insert_many(conn, aliases, L_COLS, rows_l)
        done += k
        if progress is not None:
            progress(done, n)
    if registry.engine.dialect.name == "postgresql" and n:  # explicit ids do not advance the id sequence
        with regdb.write_tx(registry.engine) as conn:
            conn.execute(sa.text("SELECT setval(pg_get_serial_sequence('adapters', 'id'), (SELECT max(id) FROM adapters))"))
    return done


def commit_live(reg, base, ref: str, seed: int, rank: int = 4) -> str:
    """Commit a random adapter strong enough to change the tiny model's output and make it ``live``; its digest."""
    adapter = LoraAdapter.create(base, LoraSpec(rank=rank, alpha=2 * rank, target_modules="all"), seed=seed,
                                 init="random")
    for _, B in adapter.weights.values():
        B.mul_(100.0)  # strong enough to change the tiny random model's greedy output
    reg.create_adapter(ref, exist_ok=True)
    rev = reg.commit(ref, to_bytes(adapter), Provenance(base_fingerprint=base.fingerprint, method="test"),
                     aliases=("candidate",))
    reg.set_alias(ref, "live", rev.number, reason="test")
    return rev.digest
