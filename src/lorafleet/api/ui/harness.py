"""What the dashboard's browser tests and benchmark share: a real server on loopback, a fleet seeded in bulk,
and headless Chromium (Debian's ``chromium`` package, driven by Playwright; never a downloaded browser)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import sqlalchemy as sa
import uvicorn

from lorafleet.registry import db as regdb
from lorafleet.registry.pgtest import free_port
from lorafleet.registry.records import default_code_version
from lorafleet.registry.schema import adapters, aliases, revisions

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class LoopbackServer:
    """``create_app(service)`` under uvicorn in a thread on 127.0.0.1 (a real HTTP server, not ASGI in-process)."""

    def __init__(self, service, *, startup_timeout_s: float = 30.0) -> None:
        from lorafleet.api.app import create_app  # noqa: PLC0415

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


def bulk_seed(registry, n: int, *, digest: str, size: int, base_fingerprint: str, users_per_tenant: int = 10_000,
              adapter_name: str = "style", batch: int = 20_000, progress=None) -> int:
    """Insert ``n`` identities ``tNNNN/uNNNNNN/<adapter_name>``, each with revision 1 (blob ``digest``) and a
    ``live`` alias, as bulk SQL in the registry's schema (not ``n`` commits). Returns the number inserted.

    Every revision points at the same existing blob, so each seeded adapter's page and chat route work.
    """
    if n < 0 or users_per_tenant < 1:
        raise ValueError("n must be >= 0 and users_per_tenant >= 1")
    now = datetime.now(UTC)
    code_version = default_code_version()
    with regdb.write_tx(registry.engine) as conn:
        next_id = (conn.execute(sa.select(sa.func.max(adapters.c.id))).scalar() or 0) + 1
    done = 0
    while done < n:
        k = min(batch, n - done)
        ids = range(next_id + done, next_id + done + k)
        rows_a, rows_r, rows_l = [], [], []
        for j, aid in enumerate(ids):
            i = done + j
            rows_a.append({"id": aid, "tenant": f"t{i // users_per_tenant:04d}", "username": f"u{i % users_per_tenant:06d}",
                           "name": adapter_name, "latest": 1, "creator": "seed", "description": "", "created_at": now})
            rows_r.append({"adapter_id": aid, "number": 1, "digest": digest, "size": size,
                           "base_fingerprint": base_fingerprint, "parent": None, "parent_digest": None,
                           "method": "seed", "hyperparams": {}, "dataset_digest": None, "example_count": None,
                           "code_version": code_version, "creator": "seed", "produced_at": now, "metrics": {},
                           "created_at": now})
            rows_l.append({"adapter_id": aid, "name": "live", "number": 1, "updated_at": now})
        with regdb.write_tx(registry.engine) as conn:
            conn.execute(adapters.insert(), rows_a)
            conn.execute(revisions.insert(), rows_r)
            conn.execute(aliases.insert(), rows_l)
        done += k
        if progress is not None:
            progress(done, n)
    return done
