"""The dashboard's server side over real HTTP: auth, static files, skip-scan listings, gate/pin actions."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.api.app import create_app
from lorafleet.api.ui import STATIC, fleet
from lorafleet.api.ui.routes import FORGET_PATHS
from lorafleet.registry import Provenance
from lorafleet.testing.harness import bulk_seed

GOOD = {"eval_set": "s", "eval_digest": "d1", "adherence": 0.9, "eval_loss": 1.0, "probe_ppl_ratio": 1.05,
        "probe_retention": 1.0, "base_adherence": 0.0, "base_eval_loss": 2.0}


def _commit(server, ref: str, seed: int, metrics: dict, alias: str = "candidate") -> int:
    reg, base = server.registry, server.base
    adapter = LoraAdapter.create(base, LoraSpec(rank=2, alpha=4, target_modules="all"), seed=seed, init="random")
    reg.create_adapter(ref, exist_ok=True)
    return reg.commit(ref, to_bytes(adapter), Provenance(base_fingerprint=base.fingerprint, method="test",
                                                         metrics=metrics), aliases=(alias,)).number


@pytest.mark.parametrize("path", ["/ui/api/whoami", "/ui/api/summary", "/ui/api/live", "/ui/api/tenants",
                                  "/ui/api/tenants/acme/users", "/ui/api/capabilities",
                                  "/ui/api/adapters/acme/alice/style/residency"])
def test_data_needs_an_admin_key(server, path):
    assert httpx.get(server.url + path).status_code == 401
    tenant = {"authorization": f"Bearer {server.keys['acme']}"}
    r = httpx.get(server.url + path, headers=tenant)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"


def test_static_page_is_public_and_self_contained(server):
    r = httpx.get(server.url + "/ui", follow_redirects=True)
    assert r.status_code == 200 and '<script type="module" src="js/app.js">' in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(server.url + "/ui/js/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(server.url + "/ui/nope.js").status_code == 404
    # nothing is fetched from another host at run time: no absolute URL in any static file but the SVG namespace
    for path in STATIC.rglob("*"):
        if path.is_file():
            urls = set(re.findall(r"https?://[^\s\"'`)]+", path.read_text())) - {"http://www.w3.org/2000/svg"}
            assert not urls, f"{path.name} refers to {urls}"


def test_tenants_and_users_skip_scan_match_a_full_scan(server, admin_client):
    reg = server.registry
    live = reg.resolve("acme/alice/style")
    bulk_seed(reg, 230, digest=live.digest, size=live.size, base_fingerprint=server.base.fingerprint,
              users_per_tenant=70)  # t0000..t0003, 70 + 70 + 70 + 20 users
    everything, cursor = [], None
    while True:
        items, cursor = reg.list_adapters(limit=1000, cursor=cursor)
        everything += items
        if cursor is None:
            break
    want_tenants = sorted({a.tenant for a in everything})
    got, after = [], None
    while True:
        page = admin_client.get("/ui/api/tenants", params={"limit": 2, **({"after": after} if after else {})}).json()
        got += page["data"]
        after = page["next_after"]
        if after is None:
            break
    assert got == want_tenants and {"acme", "globex", "t0000", "t0003"} <= set(got)
    users = admin_client.get("/ui/api/tenants/t0001/users", params={"limit": 200}).json()
    assert users["data"] == sorted({a.user for a in everything if a.tenant == "t0001"}) and len(users["data"]) == 70
    page1 = admin_client.get("/ui/api/tenants/t0001/users", params={"limit": 50}).json()
    page2 = admin_client.get("/ui/api/tenants/t0001/users", params={"limit": 50, "after": page1["next_after"]}).json()
    assert page1["data"] + page2["data"] == users["data"] and page2["next_after"] is None
    totals = admin_client.get("/ui/api/summary", params={"fresh": True}).json()
    assert totals["adapters"] == len(everything)
    assert totals["tenants"] == len(want_tenants)
    assert totals["users"] == len({(a.tenant, a.user) for a in everything})
    assert totals["live"] == sum("live" in a.aliases for a in everything)
    for bad in ({"after": "Not A Name"}, {"limit": 0}, {"limit": fleet.MAX_PAGE + 1}):
        r = admin_client.get("/ui/api/tenants", params=bad)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["message"]


def test_promote_through_the_gate(server, admin_client):
    ref = "acme/gated/style"
    bad = _commit(server, ref, 10, {**GOOD, "probe_ppl_ratio": 3.0})
    r = admin_client.post(f"/ui/api/adapters/{ref}/promote", json={"number": bad})
    assert r.status_code == 200 and r.json()["promoted"] is False
    assert "competence probe failed" in r.json()["reason"]
    assert "live" not in admin_client.get(f"/v1/adapters/{ref}").json()["aliases"]  # nothing moved
    good = _commit(server, ref, 11, GOOD)
    d = admin_client.post(f"/ui/api/adapters/{ref}/promote", json={"number": good, "reason": "ui"}).json()
    assert d["promoted"] and d["reference"] == "base"
    assert admin_client.get(f"/v1/adapters/{ref}").json()["aliases"]["live"] == good
    audit = admin_client.get(f"/v1/adapters/{ref}/audit").json()["data"]
    assert audit[0]["alias"] == "live" and audit[0]["actor"].startswith("key:") and "gate promoted" in audit[0]["reason"]
    d = admin_client.post(f"/ui/api/adapters/{ref}/promote", json={"number": bad, "force": True, "reason": "x"}).json()
    assert d["forced"] and admin_client.get(f"/v1/adapters/{ref}").json()["aliases"]["live"] == bad
    assert admin_client.post(f"/ui/api/adapters/{ref}/promote", json={"number": 99}).status_code == 404
    assert admin_client.post(f"/ui/api/adapters/{ref}/promote", json={"number": 0}).status_code == 400


def test_pin_and_residency(server, admin_client):
    ref = "acme/alice/style"
    before = admin_client.get(f"/ui/api/adapters/{ref}/residency").json()
    assert before["live"] is not None and before["digest"] == server.registry.resolve(ref).digest
    r = admin_client.post(f"/ui/api/adapters/{ref}/pin", json={"pinned": True})
    assert r.status_code == 200 and r.json()["pinned"] is True
    after = admin_client.get(f"/ui/api/adapters/{ref}/residency").json()
    assert after["pinned"] is True and after["tier"] in ("ram", "slot")
    assert admin_client.get("/ui/api/live").json()["tiers"]["pinned"] == 1
    assert admin_client.post(f"/ui/api/adapters/{ref}/pin", json={"pinned": False}).json()["pinned"] is False
    assert admin_client.get(f"/ui/api/adapters/{ref}/residency").json()["pinned"] is False
    # at most max_cached - max_active pins (8 - 4): the fifth is refused and leaves the others as they were
    refs = [f"acme/pin{i}/style" for i in range(5)]
    for i, r5 in enumerate(refs):
        _commit(server, r5, 20 + i, {}, alias="live")
    for r4 in refs[:4]:
        assert admin_client.post(f"/ui/api/adapters/{r4}/pin", json={"pinned": True}).status_code == 200
    r = admin_client.post(f"/ui/api/adapters/{refs[4]}/pin", json={"pinned": True})
    assert r.status_code == 409 and "max_cached - max_active" in r.json()["error"]["message"]
    assert admin_client.get(f"/ui/api/adapters/{refs[4]}/residency").json()["pinned"] is False
    for r4 in refs[:4]:
        admin_client.post(f"/ui/api/adapters/{r4}/pin", json={"pinned": False})
    r = admin_client.post("/ui/api/adapters/acme/nolive/style/pin", json={"pinned": True})
    assert r.status_code == 404


def test_live_numbers_move_with_traffic(server, admin_client):
    first = admin_client.get("/ui/api/live").json()
    r = admin_client.post("/v1/chat/completions", json={"model": "acme/bob/style", "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    second = admin_client.get("/ui/api/live").json()
    assert second["counters"]["tokens_generated"] > first["counters"]["tokens_generated"]
    assert second["lookups"] > first["lookups"]
    assert set(second["tiers"]) >= {"slots", "slots_max", "ram", "ram_max", "pinned"}
    assert abs(sum(v for v in second["hit_rates"].values()) - 1.0) < 1e-9
    assert set(second["jobs"]) == {"queued", "running", "succeeded", "failed", "cancelled"}


@pytest.mark.parametrize("path", FORGET_PATHS)
def test_forget_capability_follows_the_route(server, path):
    headers = {"authorization": f"Bearer {server.keys['admin']}"}
    app = create_app(server.service, manage_lifecycle=False)
    built_in = [p for p in FORGET_PATHS if "delete" in app.openapi()["paths"].get(p, {})]
    with TestClient(app) as client:
        caps = client.get("/ui/api/capabilities", headers=headers).json()
    assert caps == {"forget": bool(built_in), "forget_path": built_in[0] if built_in else None, "pin": True}
    if not built_in:  # a build without the route: the page offers forget once a route like this appears
        app = create_app(server.service, manage_lifecycle=False)
        app.router.add_api_route(path, lambda tenant, user: {}, methods=["DELETE"])
        with TestClient(app) as client:
            caps = client.get("/ui/api/capabilities", headers=headers).json()
        assert caps["forget"] is True and caps["forget_path"] == path


def test_fleet_queries_on_both_databases(registry_url, tmp_path):
    """Skip scans, totals and bulk seeding through the schema on SQLite and PostgreSQL alike."""
    from lorafleet.registry import Registry  # noqa: PLC0415

    reg = Registry(registry_url, str(tmp_path / "blobs"))
    try:
        assert fleet.distinct_tenants(reg.engine) == ([], None)
        assert fleet.count_totals(reg.engine).adapters == 0
        assert bulk_seed(reg, 250, digest="ab" * 32, size=1, base_fingerprint="f" * 64, users_per_tenant=100) == 250
        assert reg.get_adapter("t0002/u000049/style").aliases == {"live": 1}
        assert reg.resolve("t0002/u000049/style").created_at.tzinfo is not None
        page, after = fleet.distinct_tenants(reg.engine, limit=2)
        assert page == ["t0000", "t0001"] and after == "t0001"
        assert fleet.distinct_tenants(reg.engine, after=after, limit=2) == (["t0002"], None)
        users, after = fleet.distinct_users(reg.engine, "t0002", limit=49)
        assert users[0] == "u000000" and users[-1] == "u000048" and after == "u000048"
        assert fleet.distinct_users(reg.engine, "t0002", after=after, limit=49)[0] == ["u000049"]
        totals = fleet.count_totals(reg.engine)
        assert (totals.tenants, totals.users, totals.adapters, totals.live) == (3, 250, 250, 250)
        stats = fleet.FleetStats(reg.engine, ttl_s=3600)
        first = stats.totals()
        reg.create_adapter("zeta/new/style")
        assert stats.totals() == first  # cached
        assert stats.totals(fresh=True).adapters == 251
        with pytest.raises(ValueError, match="limit must be"):
            fleet.distinct_tenants(reg.engine, limit=0)
    finally:
        reg.close()


def test_stale_totals_are_answered_at_once_and_recounted_behind(tmp_path):
    from lorafleet.registry import Registry  # noqa: PLC0415

    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "blobs"))
    stats = fleet.FleetStats(reg.engine, ttl_s=0.0)
    assert stats.totals().adapters == 0
    reg.create_adapter("acme/a/style")
    assert stats.totals().adapters == 0  # stale: answered from the cache, a recount starts behind it
    deadline = time.monotonic() + 10
    while stats.totals().adapters != 1:
        assert time.monotonic() < deadline, "the background recount never landed"
        time.sleep(0.02)
    reg.close()
