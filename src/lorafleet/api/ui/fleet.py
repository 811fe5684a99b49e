"""Fleet queries for the dashboard that stay fast with millions of identities.

Tenants and users are listed by a *skip scan* over the ``(tenant, username, name)`` unique index: each
next distinct value is one index descent (``WHERE tenant > :last ORDER BY tenant LIMIT 1``), so a page of
50 tenants costs 50 descents however many adapters each tenant has. The fleet totals need full index scans
(``COUNT``), so :class:`FleetStats` computes them at most once per ``ttl_s`` and the page never waits for
them before rendering its rows.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa

from lorafleet.registry import db as regdb
from lorafleet.registry.names import check_segment
from lorafleet.registry.schema import adapters, aliases

MAX_PAGE = 200


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be an integer between 1 and {MAX_PAGE}, got {limit!r}")
    return limit


def _skip_scan(engine: sa.Engine, column, where, after: str | None, limit: int) -> tuple[list[str], str | None]:
    """Distinct values of ``column`` after ``after`` by index skip-scan: one ``> last ... LIMIT 1`` lookup per value,
    so the cost follows the page size, not the number of adapters."""
    out: list[str] = []
    with regdb.read_tx(engine) as conn:
        last = after
        for _ in range(limit + 1):
            stmt = sa.select(column).where(*where).order_by(column).limit(1)
            if last is not None:
                stmt = stmt.where(column > last)
            last = conn.execute(stmt).scalar()
            if last is None:
                break
            out.append(last)
    more = len(out) > limit
    return out[:limit], (out[limit - 1] if more else None)


def distinct_tenants(engine: sa.Engine, *, after: str | None = None, limit: int = 50) -> tuple[list[str], str | None]:
    """Up to ``limit`` tenant names after ``after`` (ordered); the second value continues the listing."""
    _check_limit(limit)
    if after is not None:
        check_segment(after, "tenant")
    return _skip_scan(engine, adapters.c.tenant, (), after, limit)


def distinct_users(engine: sa.Engine, tenant: str, *, after: str | None = None,
                   limit: int = 50) -> tuple[list[str], str | None]:
    """Up to ``limit`` user names of ``tenant`` after ``after``; the second value continues the listing."""
    _check_limit(limit)
    check_segment(tenant, "tenant")
    if after is not None:
        check_segment(after, "user")
    return _skip_scan(engine, adapters.c.username, (adapters.c.tenant == tenant,), after, limit)


@dataclass(frozen=True)
class Totals:
    """Fleet-wide counts, measured at ``computed_at`` (unix seconds) in ``took_ms``."""

    tenants: int
    users: int
    adapters: int
    live: int
    computed_at: float
    took_ms: float

    def to_dict(self) -> dict:
        return {"tenants": self.tenants, "users": self.users, "adapters": self.adapters, "live": self.live,
                "computed_at": self.computed_at, "took_ms": round(self.took_ms, 1)}


def count_totals(engine: sa.Engine) -> Totals:
    """Count tenants, users (distinct tenant/user), adapters and adapters with a ``live`` alias."""
    t0 = time.perf_counter()
    users_q = sa.select(sa.func.count()).select_from(
        sa.select(adapters.c.tenant, adapters.c.username).distinct().subquery())
    with regdb.read_tx(engine) as conn:
        n_adapters = conn.execute(sa.select(sa.func.count()).select_from(adapters)).scalar_one()
        n_users = conn.execute(users_q).scalar_one()
        n_live = conn.execute(sa.select(sa.func.count()).select_from(aliases)
                              .where(aliases.c.name == "live")).scalar_one()
    n_tenants = 0
    after = None
    while True:  # skip scan: one index descent per tenant
        page, after = distinct_tenants(engine, after=after, limit=MAX_PAGE)
        n_tenants += len(page)
        if after is None:
            break
    return Totals(n_tenants, n_users, n_adapters, n_live, time.time(), (time.perf_counter() - t0) * 1000)


class FleetStats:
    """:func:`count_totals`, cached for ``ttl_s`` seconds.

    Stale-while-revalidate: once a count exists, a caller gets it at once and a stale one is recounted in a
    background thread (one at a time), so no page load waits for a full index scan after the first.
    """

    def __init__(self, engine: sa.Engine, ttl_s: float = 30.0) -> None:
        self.engine = engine
        self.ttl_s = ttl_s
        self._lock = threading.Lock()  # guards _cached and _refreshing
        self._count_lock = threading.Lock()  # one count at a time
        self._cached: Totals | None = None
        self._refreshing = False

    def _recount(self) -> Totals:
        with self._count_lock:
            totals = count_totals(self.engine)
        with self._lock:
            self._cached = totals
        return totals

    def _background(self) -> None:
        try:
            self._recount()
        except Exception:  # noqa: BLE001 - the stale value stays; the next call tries again
            pass
        finally:
            with self._lock:
                self._refreshing = False

    def totals(self, *, fresh: bool = False) -> Totals:
        with self._lock:
            cached = self._cached
            stale = cached is not None and time.time() - cached.computed_at > self.ttl_s
            if stale and not fresh and not self._refreshing:
                self._refreshing = True
                threading.Thread(target=self._background, name="lorafleet-fleet-totals", daemon=True).start()
        if cached is None or fresh:
            return self._recount()
        return cached
