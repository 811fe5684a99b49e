"""The dashboard's JSON routes (``/ui/api/...``, admin key): what the management API does not already answer.

The page reads adapters, revisions, audit and jobs from the management API (``/v1/...``) directly; these
routes add fleet totals, a skip-scan listing of tenants and users, a compact live-metrics poll, the
residency state of one adapter, and the actions the management API lacks: promote through the gate and
pin/unpin in the engine's residency.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from lorafleet import __version__
from lorafleet.api.auth import admin_key
from lorafleet.api.errors import ApiError
from lorafleet.api.keys import ApiKey
from lorafleet.api.ui import fleet
from lorafleet.evaluation import gate
from lorafleet.evaluation.errors import EvaluationError

router = APIRouter(prefix="/ui/api", tags=["dashboard"])
Admin = Annotated[ApiKey, Depends(admin_key)]
Name = Annotated[str, Path(min_length=1, max_length=63)]
Segment = Annotated[str | None, Query(min_length=1, max_length=63)]
Page = Annotated[int, Query(ge=1, le=fleet.MAX_PAGE)]
MAX_INT = 2**31 - 1
PIN_WAIT_S = 5.0
# Forgetting a user is another feature's route; the page offers it only when this app has it.
FORGET_PATHS = ("/admin/users/{tenant}/{user}", "/v1/admin/users/{tenant}/{user}", "/v1/users/{tenant}/{user}")


class PromoteRequest(BaseModel):
    number: int = Field(..., ge=1, le=MAX_INT, description="the revision to promote to live")
    force: bool = Field(False, description="skip the gate (audited as forced)")
    reason: str = Field("", max_length=2000)


class PinRequest(BaseModel):
    pinned: bool = Field(..., description="true: keep the live revision resident; false: release the pin")


class Throughput:
    """Tokens/s and requests/s over the last ``window_s`` seconds of polls (shared by every viewer)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, int, int]] = deque()

    def rate(self, tokens: int, finished: int) -> tuple[float | None, float | None]:
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, tokens, finished))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
                self._samples.popleft()
            t0, tok0, fin0 = self._samples[0]
        if now - t0 < 0.5:
            return None, None
        return (tokens - tok0) / (now - t0), (finished - fin0) / (now - t0)


def _svc(request: Request):
    return request.app.state.service


def _ref(tenant: str, user: str, name: str) -> str:
    return f"{tenant}/{user}/{name}"


def _stats(request: Request) -> fleet.FleetStats:
    return request.app.state.ui_stats


def _engine(request: Request):
    engine = _svc(request).engine
    if engine is None:
        raise ApiError(503, "this server has no inference engine attached", type_="server_error", code="no_engine")
    return engine


@router.get("/whoami", summary="The key in use, the server's version and base (checks an admin key)")
def whoami(request: Request, key: Admin) -> dict:
    svc = _svc(request)
    return {"key": key.to_dict(), "version": __version__, "base": svc.base.name,
            "base_fingerprint": svc.base.fingerprint, "engine": svc.engine is not None}


@router.get("/capabilities", summary="Which optional routes this build has (e.g. forgetting a user)")
def capabilities(request: Request, _: Admin) -> dict:
    # The OpenAPI paths, not app.routes: FastAPI keeps included routers as nested objects there.
    paths = request.app.openapi().get("paths", {})
    found = next((p for p in FORGET_PATHS if "delete" in paths.get(p, {})), None)
    return {"forget": found is not None, "forget_path": found, "pin": _svc(request).engine is not None}


@router.get("/summary", summary="Fleet totals: tenants, users, adapters, live adapters (cached for 30 s)")
def summary(request: Request, _: Admin, fresh: bool = Query(False, description="recount now")) -> dict:
    return _stats(request).totals(fresh=fresh).to_dict()


@router.get("/tenants", summary="Tenants in name order (skip scan: one index lookup per tenant)")
def tenants(request: Request, _: Admin, after: Segment = None, limit: Page = 50) -> dict:
    names, nxt = fleet.distinct_tenants(_svc(request).registry.engine, after=after, limit=limit)
    return {"object": "list", "data": names, "next_after": nxt}


@router.get("/tenants/{tenant}/users", summary="Users of a tenant in name order (skip scan)")
def users(tenant: Name, request: Request, _: Admin, after: Segment = None, limit: Page = 50) -> dict:
    names, nxt = fleet.distinct_users(_svc(request).registry.engine, tenant, after=after,
                                      limit=limit)
    return {"object": "list", "data": names, "next_after": nxt}


@router.get("/live", summary="Throughput, queue depth, residency tiers and hit rates, jobs by state (poll me)")
def live(request: Request, _: Admin) -> dict:
    svc = _svc(request)
    out: dict = {"time": time.time(), "engine": svc.engine is not None, "jobs": svc.jobs.counts()}
    if svc.engine is None:
        return out
    snap = svc.engine.metrics_snapshot()
    res = svc.engine.residency_snapshot()
    c, g = snap["counters"], snap["gauges"]
    tokens_s, requests_s = request.app.state.ui_throughput.rate(c["tokens_generated"], c["requests_finished"])
    lookups = c["hits_slot"] + c["hits_ram"] + c["misses"]
    out.update({
        "tokens_per_s": tokens_s, "requests_per_s": requests_s,
        "queue_depth": g.get("inbox", 0) + g.get("queue_ready", 0) + g.get("queue_loading", 0),
        "running": g.get("running", 0),
        "counters": {k: c[k] for k in ("tokens_generated", "prompt_tokens", "requests_finished", "requests_failed",
                                       "hits_slot", "hits_ram", "misses", "evictions_ram")},
        "tiers": {"slots": sum(s["digest"] is not None for s in res["slots"]), "slots_max": res["max_active"],
                  "ram": len(res["ram"]), "ram_max": res["max_cached"], "loading": len(res["loading"]),
                  "pinned": sum(r["pinned"] for r in res["ram"]), "policy": res["policy"]},
        "lookups": lookups,
        "hit_rates": {"slot": c["hits_slot"] / lookups if lookups else None,
                      "ram": c["hits_ram"] / lookups if lookups else None,
                      "cold": c["misses"] / lookups if lookups else None},
        "ttft_p50_s": snap["histograms"]["time_to_first_token"].get("p50"),
    })
    return out


@router.get("/adapters/{tenant}/{user}/{name}/residency",
            summary="Where the adapter's live revision is: compute slot, RAM, loading or cold; and whether pinned")
def adapter_residency(tenant: Name, user: Name, name: Name, request: Request, _: Admin) -> dict:
    svc = _svc(request)
    ref = _ref(tenant, user, name)
    info = svc.registry.get_adapter(ref)
    live_no = info.aliases.get("live")
    out = {"ref": ref, "live": live_no, "digest": None, "tier": None, "pinned": False, "pinned_revisions": []}
    if svc.engine is None:
        return out
    history = svc.registry.history(ref)
    by_digest = {r.digest: r.number for r in history}
    snap = svc.engine.residency_snapshot()
    entries = {r["digest"]: r for r in snap["ram"]}
    out["pinned_revisions"] = sorted({by_digest[d] for d, r in entries.items() if r["pinned"] and d in by_digest})
    if live_no is None:
        return out
    digest = next(r.digest for r in history if r.number == live_no)
    entry = entries.get(digest)
    tier = "cold"
    if entry is not None:
        tier = "slot" if entry["slot"] is not None else "ram"
    elif digest in snap["loading"]:
        tier = "loading"
    out.update({"digest": digest, "tier": tier, "pinned": live_no in out["pinned_revisions"]})
    return out


@router.post("/adapters/{tenant}/{user}/{name}/promote", summary="Promote a revision to live through the gate")
def promote(tenant: Name, user: Name, name: Name, body: PromoteRequest, request: Request, key: Admin) -> dict:
    address = f"{_ref(tenant, user, name)}#{body.number}"
    try:
        decision = gate.promote(_svc(request).registry, address, force=body.force, reason=body.reason,
                                actor=f"key:{key.id}")
    except EvaluationError as exc:
        raise ApiError(422, str(exc), code="gate_error") from None
    return decision.to_dict()


@router.post("/adapters/{tenant}/{user}/{name}/pin",
             summary="Pin (or unpin) the live revision in the engine's residency (this process, not persisted)")
def pin(tenant: Name, user: Name, name: Name, body: PinRequest, request: Request, _: Admin) -> dict:
    engine = _engine(request)
    ref = _ref(tenant, user, name)
    rev = _svc(request).registry.resolve(f"{ref}@live")  # 404 names the missing live alias
    if body.pinned:
        try:
            engine.pin(rev.digest)
        except ValueError as exc:  # too many pins for max_cached - max_active
            raise ApiError(409, str(exc), type_="conflict_error", code="pin_capacity") from None
        # A cold adapter loads in the background; wait a little so the answer (and the page) shows it resident.
        deadline = time.monotonic() + PIN_WAIT_S
        while engine.residency.state(rev.digest) in ("queued", "loading") and time.monotonic() < deadline:
            time.sleep(0.02)
    else:
        engine.unpin(rev.digest)
    return {"ref": ref, "number": rev.number, "digest": rev.digest, "pinned": body.pinned}
