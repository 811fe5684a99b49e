"""Dashboard at fleet scale: time to first rendered rows in headless Chromium, and the JSON calls behind the
page, for registries of 1k / 100k / 1M identities side by side (ratios against the smallest).

Each size gets a fresh SQLite registry, bulk-seeded through the registry's schema (one real adapter blob that
every seeded revision points at), a real server on loopback (tiny base) and Debian's chromium via Playwright.
"Time to first rows" is measured inside the page: navigation start -> the adapters table's first 50 rows in
the DOM (``performance.now()`` when they are appended). The first load of each server (cold browser context,
first requests) is reported apart from the warm loads.

    python benchmarks/dashboard_render.py                      # 1k, 100k, 1M (~3-5 minutes on a shared CPU)
    python benchmarks/dashboard_render.py --sizes 1000,100000 --loads 3
    python benchmarks/dashboard_render.py --screenshots docs/results/ui   # also the README's screenshots
    python benchmarks/dashboard_render.py --quick              # smoke run: 1k and 10k, 2 loads, nothing written
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from _common import console, markdown_table, show, write_result  # noqa: E402

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes  # noqa: E402
from lorafleet.api.service import Service  # noqa: E402
from lorafleet.base import load_base  # noqa: E402
from lorafleet.registry import Provenance, Registry  # noqa: E402
from lorafleet.registry.registry import encode_cursor  # noqa: E402
from lorafleet.serving.engine import Engine  # noqa: E402
from lorafleet.serving.params import EngineConfig  # noqa: E402
from lorafleet.serving.sources import registry_fetch  # noqa: E402
from lorafleet.testing.harness import LoopbackServer, bulk_seed, launch_chromium  # noqa: E402

BUDGET_S = 1.0
USERS_PER_TENANT = 10_000


def _adapter(base, seed: int) -> bytes:
    adapter = LoraAdapter.create(base, LoraSpec(rank=4, alpha=8, target_modules="all"), seed=seed, init="random")
    for _, B in adapter.weights.values():
        B.mul_(100.0)
    return to_bytes(adapter)


def _showcase(reg: Registry, base) -> None:
    """A few hand-made adapters with a revision history, metrics and a gate decision (for the screenshots)."""
    ref = "acme/alice/assistant"
    reg.create_adapter(ref, description="alice's writing style: signs off with '— Alice'")
    metrics = [(0.45, 1.31, 1.04), (0.80, 1.12, 1.07), (0.95, 1.05, 1.09)]
    for i, (adh, loss, ppl) in enumerate(metrics, start=1):
        m = {"eval_set": "alice-heldout", "eval_digest": "e1", "adherence": adh, "eval_loss": loss,
             "probe_ppl_ratio": ppl, "probe_retention": 1.0, "base_adherence": 0.0, "base_eval_loss": 1.62}
        prov = Provenance(base_fingerprint=base.fingerprint, method="sft", parent=i - 1 or None, metrics=m,
                          hyperparams={"rank": 4, "alpha": 8, "lr": 0.003, "steps": 30}, dataset_digest=f"{i:02x}" * 32,
                          example_count=24 * i)
        rev = reg.commit(ref, _adapter(base, i), prov, aliases=("candidate",))
        reg.set_alias(ref, "live", rev.number, reason=f"gate promoted {rev.address}: adherence {adh:.2f}")
    reg.rollback(ref, actor="key:1", reason="user reported the new sign-off too formal")
    for seed, user in enumerate(("bob", "carol"), start=10):
        reg.create_adapter(f"acme/{user}/assistant")
        reg.commit(f"acme/{user}/assistant", _adapter(base, seed), Provenance(base_fingerprint=base.fingerprint,
                                                                                  method="sft"),
                   aliases=("candidate", "live"))


def _train_jobs(reg: Registry, base) -> None:
    from lorafleet.training.data import dataset_from_records  # noqa: PLC0415
    from lorafleet.training.jobs import JobQueue  # noqa: PLC0415
    from lorafleet.training.trainer import TrainConfig  # noqa: PLC0415
    from lorafleet.training.worker import Worker  # noqa: PLC0415

    records = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer"}]}
               for i in range(8)]
    queue = JobQueue(reg)
    for user, steps in (("bob", 24), ("carol", 16)):
        queue.submit(f"acme/{user}/assistant", dataset_from_records(records, "sft"), LoraSpec(rank=2, alpha=4),
                     TrainConfig(steps=steps, lr=0.01, batch_size=2, max_len=32), warm_start="none")
    Worker(reg, base).run(until_idle=True)
    queue.submit("acme/alice/assistant", dataset_from_records(records, "sft"), LoraSpec(rank=2, alpha=4),
                 TrainConfig(steps=30), warm_start="none")


def _time_to_rows(browser, url: str, key: str) -> float:
    context = browser.new_context()
    context.add_init_script(f"sessionStorage.setItem('lorafleet.adminKey', {key!r})")
    page = context.new_page()
    page.goto(f"{url}/ui/")
    page.wait_for_selector("#adapter-rows tr[data-ref]")
    ms = float(page.evaluate("document.body.dataset.rowsRenderedMs"))
    if page.locator("#adapter-rows tr[data-ref]").count() != 50:
        raise RuntimeError("the overview did not render a full page of 50 rows")
    context.close()
    return ms / 1000.0


def _api_times(url: str, key: str, n: int, repeats: int = 5) -> dict[str, float]:
    """Median wall time (ms) of the JSON calls behind the page, at the start and deep into the listing."""
    last_tenant = f"t{(n - 1) // USERS_PER_TENANT:04d}"
    deep = encode_cursor(last_tenant, f"u{max(0, (n - 1) % USERS_PER_TENANT - 100):06d}", "style")
    calls = {
        "first page (50)": "/v1/adapters?limit=50",
        "deep page (cursor near the end)": f"/v1/adapters?limit=50&cursor={deep}",
        "prefix search": f"/v1/adapters?limit=50&prefix={last_tenant}/u0001",
        "tenants (skip scan, 25)": "/ui/api/tenants?limit=25",
        "users of a tenant (skip scan, 25)": f"/ui/api/tenants/{last_tenant}/users?limit=25",
        "live metrics": "/ui/api/live",
        "fleet totals, recounted": "/ui/api/summary?fresh=true",
    }
    out = {}
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=120) as client:
        for name, path in calls.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = client.get(path)
                times.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")
            out[name] = statistics.median(times)
    return out


def _traffic(url: str, key: str, refs: list[str], stop: threading.Event) -> None:
    """Chat requests against a few adapters, so the live numbers and residency tiers have something to show."""
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=120) as client:
        i = 0
        while not stop.is_set():
            client.post("/v1/chat/completions", json={"model": refs[i % len(refs)], "max_tokens": 16,
                                                      "messages": [{"role": "user", "content": "hello"}]})
            i += 1


def _screenshots(browser, url: str, key: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.add_init_script(f"sessionStorage.setItem('lorafleet.adminKey', {key!r})")
    page = context.new_page()
    page.goto(f"{url}/ui/")
    page.wait_for_selector("#adapter-rows tr[data-ref]")
    page.wait_for_timeout(7000)  # a few live polls for the sparklines
    page.screenshot(path=str(out / "overview.png"))
    page.goto(f"{url}/ui/#/adapter/acme/alice/assistant")
    page.wait_for_selector("#timeline li.rev")
    page.locator("#timeline li.rev summary").first.click()
    page.screenshot(path=str(out / "adapter.png"), full_page=True)
    page.goto(f"{url}/ui/#/jobs")
    page.locator("#job-rows tr[data-job] a").first.wait_for()
    page.locator("#job-rows tr[data-job]").nth(1).locator("a").first.click()
    page.wait_for_selector("#job-detail svg")
    page.screenshot(path=str(out / "jobs.png"), full_page=True)
    context.close()
    console.print(f"screenshots in {out}")


def run_size(n: int, loads: int, browser, base, screenshots: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="lorafleet-dash-") as tmp:
        reg = Registry(f"sqlite:///{tmp}/reg.db", f"{tmp}/blobs")
        _showcase(reg, base)
        blob = reg.resolve("acme/bob/assistant")
        t0 = time.perf_counter()
        bulk_seed(reg, n, digest=blob.digest, size=blob.size, base_fingerprint=base.fingerprint,
                  users_per_tenant=USERS_PER_TENANT,
                  progress=lambda done, total: console.print(f"  seeded {done:,}/{total:,}") if done % 200_000 == 0 else None)
        seed_s = time.perf_counter() - t0
        console.print(f"{n:,} identities seeded in {seed_s:.1f}s")
        if screenshots is not None:
            _train_jobs(reg, base)
        engine = Engine(base, registry_fetch(reg), EngineConfig(max_batch=8, max_active=4, max_cached=16, max_rank=16))
        service = Service(reg, base, engine)
        _, key = service.keys.create(admin=True, name="bench")
        with LoopbackServer(service) as srv:
            load_avg = os.getloadavg()[0]
            cold = _time_to_rows(browser, srv.url, key)
            warm = [_time_to_rows(browser, srv.url, key) for _ in range(loads)]
            api = _api_times(srv.url, key, n)
            if screenshots is not None:
                stop = threading.Event()
                refs = ["acme/alice/assistant", "acme/bob/assistant", "acme/carol/assistant", "t0000/u000001/style",
                        "t0000/u000002/style", "t0000/u000003/style"]
                worker = threading.Thread(target=_traffic, args=(srv.url, key, refs, stop), daemon=True)
                worker.start()
                _screenshots(browser, srv.url, key, screenshots)
                stop.set()
                worker.join(timeout=60)
        reg.close()
    console.print(f"  first rows: first load {cold:.3f}s, warm {[round(t, 3) for t in warm]}")
    return {"n": n, "seed_s": seed_s, "cold": cold, "warm": warm, "api": api, "load_avg": load_avg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,100000,1000000", help="registry sizes (identities), comma-separated")
    parser.add_argument("--loads", type=int, default=5, help="warm page loads per size")
    parser.add_argument("--screenshots", type=Path, default=None,
                        help="save overview/adapter/jobs screenshots here (taken at the 100k size, or the largest)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/results/dashboard.md")
    parser.add_argument("--quick", action="store_true", help="smoke run: --sizes 1000,10000 --loads 2 --no-write")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.loads, args.no_write = "1000,10000", 2, True
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 100 or args.loads < 1:
        parser.error("--sizes needs sizes of at least 100 identities and --loads at least 1")
    shot_at = 100_000 if 100_000 in sizes else max(sizes)
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    base = load_base("tiny")
    results = []
    with sync_playwright() as p:
        browser = launch_chromium(p)
        for n in sizes:
            console.print(f"[bold]{n:,} identities[/]")
            results.append(run_size(n, args.loads, browser, base, args.screenshots if n == shot_at else None))
        browser.close()

    ref = results[0]
    render_rows = []
    for r in results:
        med = statistics.median(r["warm"])
        render_rows.append([f"{r['n']:,}", f"{r['seed_s']:.1f} s", f"{r['load_avg']:.1f}", f"{r['cold'] * 1000:.0f} ms",
                            f"{min(r['warm']) * 1000:.0f} ms", f"{med * 1000:.0f} ms", f"{max(r['warm']) * 1000:.0f} ms",
                            f"x{med / statistics.median(ref['warm']):.2f}",
                            "yes" if med < BUDGET_S else "**no**"])
    render_headers = ["identities", "bulk seed", "machine load (1 min)", "first load", "warm min", "warm median",
                      "warm max", "median vs smallest",
                      f"< {BUDGET_S:.0f} s"]
    show("time to first rendered rows (headless Chromium)", render_headers, render_rows)
    api_headers = ["call", *[f"{r['n']:,}" for r in results], f"ratio {results[-1]['n']:,} / {ref['n']:,}"]
    api_rows = [[name, *[f"{r['api'][name]:.1f} ms" for r in results],
                 f"x{results[-1]['api'][name] / ref['api'][name]:.2f}"] for name in ref["api"]]
    show("the JSON calls behind the page (median of 5, loopback HTTP)", api_headers, api_rows)
    if args.no_write:
        return
    notes = (
        "Time to first rows is measured in the page (navigation start to the first 50 rows in the DOM); it "
        "includes fetching the HTML and the ES modules, the admin-key check and the keyset page "
        "`/v1/adapters?limit=50`. The fleet totals (`COUNT`s over the index) are fetched in parallel and never "
        "delay the rows; the server keeps them and recounts them in a background thread when older than 30 s — "
        "at 1M identities such a recount (about 2 s of CPU) can overlap the measurements of that size. "
        "'first load' is each server's first page "
        "view in a new browser context (first requests, cold caches). The machine is shared by several "
        "engineers' jobs (its 1-minute load average on 2 cores is in the table), so absolute numbers follow "
        "that load; the ratios are the scaling.")
    write_result("dashboard", "Fleet dashboard at scale", [
        ("Time to first rendered rows", markdown_table(render_headers, render_rows)),
        ("JSON calls behind the page", markdown_table(api_headers, api_rows)),
    ], notes)


if __name__ == "__main__":
    main()
