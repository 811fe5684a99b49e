"""Scale-out on Ray Serve: throughput with 1 vs 2 engine replicas, and a capacity model for 10^6 adapters.

    python benchmarks/ray_scale.py            # SmolLM2, 16 clients x 45 s per configuration (~10 min)
    python benchmarks/ray_scale.py --quick    # tiny model, 8 clients x 10 s (~3 min)

Side by side in one run, the same HTTP load (C client threads, each request a Zipf-drawn user's adapter, greedy,
`max_tokens` tokens) against:

  local      `lorafleet serve --no-worker` in a subprocess: one process, no Ray (the baseline)
  ray x1     the Ray Serve application with 1 engine replica
  ray x2     the same with 2 engine replicas

all over one registry on a throwaway PostgreSQL and blobs in a shared directory. Reported per configuration:
requests/s, completion tokens/s, latency p50/p99, errors, the affinity rate (requests whose adapter was already
multiplexed on the replica that got them) and the split of requests over replicas.

The capacity model for 10^6 adapters is computed from measured figures: this run's per-replica throughput and
cold-load latency, the adapter/slot/RAM bytes of docs/results/serving.md and the catalog bytes per adapter of
docs/results/registry_scale.md; hit rates under Zipf traffic come from simulating the engine's own cache
policy (SLRU) over 10^6 adapters, with adapter-affine routing against random routing.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Give me one tip for a rainy weekend."}]


# -- load generation ---------------------------------------------------------------------------------------------

def zipf_sampler(n: int, s: float, seed: int):
    cum = list(itertools.accumulate(1.0 / k**s for k in range(1, n + 1)))
    rng = random.Random(seed)
    perm = list(range(n))
    rng.shuffle(perm)

    def draw(r: random.Random) -> int:
        return perm[bisect.bisect_left(cum, r.random() * cum[-1])]

    return draw


def prime(url: str, key: str, refs: list[str], clients: int, max_tokens: int) -> None:
    """One request per adapter (not counted), so the measured window sees routing, not first loads."""
    from concurrent.futures import ThreadPoolExecutor

    def one(ref: str) -> None:
        body = {"model": ref, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        httpx.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=600)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, refs))


def run_load(url: str, key: str, refs: list[str], *, clients: int, seconds: float, warmup: float,
             max_tokens: int, zipf: float) -> dict:
    """Prime every adapter, then C closed-loop clients for warmup + seconds; only requests started after the
    warm-up are counted."""
    prime(url, key, refs, clients, max_tokens)
    draw = zipf_sampler(len(refs), zipf, seed=7)
    t_start = time.monotonic()
    t_measure, t_end = t_start + warmup, t_start + warmup + seconds
    records: list[tuple] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        r = random.Random(100 + i)
        headers = {"authorization": f"Bearer {key}"}
        with httpx.Client(timeout=300) as http:
            while (t0 := time.monotonic()) < t_end:
                ref = refs[draw(r)]
                body = {"model": ref, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}
                try:
                    resp = http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                    ok = resp.status_code == 200
                    tokens = resp.json()["usage"]["completion_tokens"] if ok else 0
                    rec = (t0, time.monotonic() - t0, ok, tokens, resp.headers.get("x-lorafleet-replica"),
                           resp.headers.get("x-lorafleet-affinity"))
                except httpx.HTTPError:
                    rec = (t0, time.monotonic() - t0, False, 0, None, None)
                with lock:
                    records.append(rec)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    time.sleep(max(0.0, t_measure - time.monotonic()))
    load_before = os.getloadavg()[0]
    for th in threads:
        th.join()
    wall = time.monotonic() - t_measure
    counted = [r for r in records if r[0] >= t_measure]
    ok = [r for r in counted if r[2]]
    lat = sorted(r[1] for r in ok)
    affinity = [r[5] for r in ok if r[5] is not None]
    by_replica: dict[str, int] = {}
    for r in ok:
        if r[4]:
            by_replica[r[4]] = by_replica.get(r[4], 0) + 1
    return {
        "requests": len(counted), "errors": len(counted) - len(ok), "wall_s": wall,
        "req_s": len(ok) / wall, "tok_s": sum(r[3] for r in ok) / wall,
        "p50_s": lat[len(lat) // 2] if lat else float("nan"),
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "affinity": (sum(a == "hit" for a in affinity) / len(affinity)) if affinity else None,
        "split": sorted(by_replica.values(), reverse=True),
        "load": f"{load_before:.1f} → {os.getloadavg()[0]:.1f}",
    }


# -- the three configurations ------------------------------------------------------------------------------------

def wait_http(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up within {timeout} s")


def run_local(args, db_url: str, blob_url: str, admin: str, key: str, refs: list[str], engine_cfg) -> dict:
    from lorafleet.testing.pgtest import free_port

    port = free_port()
    env = {**os.environ, "LORAFLEET_DB_URL": db_url, "LORAFLEET_BLOB_URL": blob_url, "LORAFLEET_ADMIN_KEY": admin,
           "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "lorafleet"), "serve", "--no-worker", "--port", str(port),
           "--base", args.base, "--max-batch", str(engine_cfg.max_batch), "--max-active", str(engine_cfg.max_active),
           "--max-cached", str(engine_cfg.max_cached), "--max-rank", str(engine_cfg.max_rank)]
    log = open(Path(blob_url).parent / "local-serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url)
        return run_load(url, key, refs, clients=args.clients, seconds=args.seconds, warmup=args.warmup,
                        max_tokens=args.max_tokens, zipf=args.zipf)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def run_ray(args, replicas: int, db_url: str, blob_url: str, admin: str, key: str, refs: list[str],
            engine_cfg) -> tuple[dict, dict]:
    from ray import serve

    from lorafleet.cluster.config import ClusterConfig
    from lorafleet.cluster.launch import deploy
    from lorafleet.cluster.ray_app import APP_NAME
    from lorafleet.testing.pgtest import free_port

    config = ClusterConfig(db_url=db_url, blob_url=blob_url, base=args.base, replicas=replicas, replica_cpus=1.0,
                           ingress_cpus=0.5, max_ongoing_requests=math.ceil(args.clients / replicas),
                           report_interval_s=0.5, engine=engine_cfg)
    port = args.ray_port or free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    deploy(config, host="127.0.0.1", port=port)
    wait_http(url)
    startup = time.monotonic() - t0
    try:
        out = run_load(url, key, refs, clients=args.clients, seconds=args.seconds, warmup=args.warmup,
                       max_tokens=args.max_tokens, zipf=args.zipf)
        time.sleep(1.0)  # one more report from every replica
        view = httpx.get(f"{url}/v1/fleet/residency", headers={"authorization": f"Bearer {admin}"}, timeout=30).json()
        out["startup_s"] = startup
        return out, view
    finally:
        serve.delete(APP_NAME)
        args.ray_port = port  # Serve's proxy keeps listening there


# -- capacity model ----------------------------------------------------------------------------------------------

def measured_inputs() -> dict:
    """Figures measured by the other benchmarks, read from their result files (None where a file lacks one)."""
    found: dict = {"catalog_bytes": None, "ram_mb": None, "blob_mb": None, "slot_mb": None, "load_p50_ms": None}
    reg = ROOT / "docs" / "results" / "registry_scale.md"
    if reg.exists():
        m = re.search(r"\|\s*catalog bytes per adapter\s*\|\s*([\d,]+)\s*\|\s*([\d,]+)\s*\|", reg.read_text())
        if m:
            found["catalog_bytes"] = int(m.group(2).replace(",", ""))  # PostgreSQL column
    srv = ROOT / "docs" / "results" / "serving.md"
    if srv.exists():
        text = srv.read_text()
        m = re.search(r"\|\s*rank 8, attention\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", text)
        if m:
            found["ram_mb"], found["blob_mb"], found["slot_mb"] = (float(g) for g in m.groups())
        m = re.search(r"### c\) Cold load.*?\n\|[^\n]*\n\|[^\n]*\n\|\s*\d+\s*\|\s*([\d.]+)\s*\|", text, re.S)
        if m:
            found["load_p50_ms"] = float(m.group(1))
    return found


def zipf_probs(n: int, s: float):
    import numpy as np

    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return w / w.sum()


def ideal_hit(p, cached: int) -> float:
    """Upper bound (and what SLRU approaches under steady Zipf): the ``cached`` most popular always resident."""
    return float(p[: min(cached, len(p))].sum())


def lru_hit(p, cached: int) -> float:
    """LRU hit rate by Che's characteristic-time approximation: T with sum(1 - e^(-p T)) = C."""
    import numpy as np

    if cached >= len(p):
        return 1.0
    lo, hi = 0.0, 1.0
    while np.sum(-np.expm1(-p * hi)) < cached:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.sum(-np.expm1(-p * mid)) < cached else (lo, mid)
    return float(np.sum(p * -np.expm1(-p * hi)))


def simulate_fleet(trace: list[int], replicas: int, capacity: int, affine: bool, policy: str) -> float:
    """Hit rate of R replicas, each a cache of ``capacity`` adapters run by the engine's own policy classes, with
    adapter-affine routing (an adapter always reaches the same replica) or random routing; second half measured."""
    from lorafleet.serving.residency import make_policy

    caches = [(make_policy(policy, capacity, 0.8), set()) for _ in range(replicas)]
    r = random.Random(3)
    half, hits = len(trace) // 2, 0
    for i, key in enumerate(trace):
        pol, resident = caches[(key * 2654435761 % 2**32) % replicas if affine else r.randrange(replicas)]
        if key in resident:
            pol.touch(key)
            hits += i >= half
            continue
        if len(resident) >= capacity:
            victim = next(pol.victims())
            pol.remove(victim)
            resident.discard(victim)
        pol.insert(key)
        resident.add(key)
    return hits / (len(trace) - half)


def capacity_model(args, per_replica_tok_s: float, load_p50_ms: float | None, inputs: dict) -> list[tuple[str, str]]:
    n = 1_000_000
    cat = inputs["catalog_bytes"]
    blob_mb, ram_mb, slot_mb = inputs["blob_mb"], inputs["ram_mb"], inputs["slot_mb"]
    load_ms = load_p50_ms or inputs["load_p50_ms"]
    req_s = per_replica_tok_s / args.max_tokens
    inputs_md = "\n".join([
        "| quantity | value | from |", "|---|---|---|",
        f"| catalog, 10^6 adapters | {cat * n / 1e9:.2f} GB | {cat:,} B per adapter (registry_scale.md, PostgreSQL) |",
        f"| blob store, 10^6 rank-8 attention adapters | {blob_mb * n / 1e6:.2f} TB | {blob_mb} MB per blob "
        "(serving.md) |",
        f"| host RAM per resident adapter | {ram_mb} MB | serving.md (deserialized entry) |",
        f"| compute slot per active adapter | {slot_mb} MB | serving.md (slot table at max_rank 8) |",
        f"| compute slots per replica (max_active {args.max_active}) | {args.max_active * slot_mb / 1024:.2f} GB | "
        "slot × max_active |",
        f"| cold load p50 (fetch + verify + parse + validate) | {load_ms:.0f} ms | "
        f"{'this run, ray x2 replicas (fleet load_latency)' if load_p50_ms else 'serving.md'} |",
        f"| cold loads per replica per s (1 parse worker) | {1000 / load_ms:.0f} | 1 / p50 |",
        f"| completion tokens/s per replica | {per_replica_tok_s:.1f} | this run, ray x1 |",
        f"| requests/s per replica at {args.max_tokens} tokens | {req_s:.2f} | tokens/s ÷ max_tokens |",
    ])
    p10, p08, p12 = zipf_probs(n, 1.0), zipf_probs(n, 0.8), zipf_probs(n, 1.2)
    rows = ["| replicas R | cache C per replica (RAM) | s=1.0 affine: ideal / LRU | s=1.0 random routing: "
            "ideal / LRU | s=0.8 affine ideal | s=1.2 affine ideal | misses/s per replica at the measured req/s "
            "(s=1.0, affine, LRU) | cold-load headroom | req/s per replica the cold loads sustain |",
            "|---|---|---|---|---|---|---|---|---|"]
    for replicas, cached in [(1, 256), (4, 256), (16, 256), (16, 4096), (64, 4096), (128, 4096), (32, 16384)]:
        fleet = replicas * cached  # affine routing: the replicas cache disjoint sets
        aff_lru = lru_hit(p10, fleet)
        miss_s = req_s * (1 - aff_lru)
        ram = f"{cached * ram_mb / 1024:.1f} GB"
        rows.append(f"| {replicas} | {cached:,} ({ram}) | {ideal_hit(p10, fleet):.1%} / {aff_lru:.1%} | "
                    f"{ideal_hit(p10, cached):.1%} / {lru_hit(p10, cached):.1%} | {ideal_hit(p08, fleet):.1%} | "
                    f"{ideal_hit(p12, fleet):.1%} | {miss_s:.2f} | "
                    f"{'∞' if miss_s == 0 else f'{(1000 / load_ms) / miss_s:.0f}×'} | "
                    f"{'∞' if aff_lru >= 1 else f'{(1000 / load_ms) / (1 - aff_lru):.0f}'} |")
    model_md = "\n".join(rows)

    print(f"capacity model: checking the approximations against the engine's policies ({args.sim_requests:,} "
          "requests) ...", flush=True)
    draw, rng = zipf_sampler(n, 1.0, seed=5), random.Random(6)
    trace = [draw(rng) for _ in range(args.sim_requests)]
    check = ["| replicas × cache | routing | simulated LRU | Che LRU | simulated SLRU | ideal |",
             "|---|---|---|---|---|---|"]
    for replicas, cached, affine in [(1, 256, True), (4, 256, True), (4, 256, False)]:
        fleet = replicas * cached if affine else cached
        sim_lru = simulate_fleet(trace, replicas, cached, affine, "lru")
        sim_slru = simulate_fleet(trace, replicas, cached, affine, "slru")
        check.append(f"| {replicas} × {cached} | {'affine' if affine else 'random'} | {sim_lru:.1%} | "
                     f"{lru_hit(p10, fleet):.1%} | {sim_slru:.1%} | {ideal_hit(p10, fleet):.1%} |")
        print(f"  R={replicas} C={cached} {'affine' if affine else 'random'}: LRU {sim_lru:.1%}, SLRU {sim_slru:.1%}",
              flush=True)
    return [("Capacity model: measured inputs", inputs_md),
            ("Capacity model: hit rates for 10^6 adapters under Zipf traffic", model_md),
            ("Capacity model: the approximations against the engine's cache policies (simulated, s=1.0)",
             "\n".join(check))]


# -- main --------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, short runs")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after priming, not counted")
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--sim-requests", type=int, default=400_000, help="Zipf trace length of the simulation")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--max-active", type=int, default=32, help="compute slots per replica")
    args = parser.parse_args()
    if args.quick:
        args.base, args.clients, args.seconds, args.warmup, args.adapters = "tiny", 8, 10.0, 2.0, 16
        args.sim_requests = min(args.sim_requests, 100_000)
    args.ray_port = None
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from _common import markdown_table, show, write_result

    from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
    from lorafleet.api.keys import KeyStore
    from lorafleet.base import load_base
    from lorafleet.cluster.launch import connect
    from lorafleet.registry import Provenance, Registry
    from lorafleet.serving.params import EngineConfig
    from lorafleet.testing.pgtest import TempPostgres

    t_all = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-ray-scale-"))
    with TempPostgres() as pg:
        db_url, blob_url = pg.create_database("ray_scale"), str(tmp / "blobs")
        registry = Registry(db_url, blob_url)
        base = load_base(args.base)
        refs = [f"bench/u{i:04d}/style" for i in range(args.adapters)]
        for i, ref in enumerate(refs):
            adapter = LoraAdapter.create(base, LoraSpec(rank=8, alpha=16, target_modules="attention"), seed=i,
                                         init="random")
            registry.create_adapter(ref)
            registry.commit(ref, to_bytes(adapter), Provenance(base_fingerprint=base.fingerprint, method="bench"),
                            aliases=("live",))
        keys = KeyStore(registry)
        _, admin = keys.create(admin=True, name="bench-admin")
        _, key = keys.create(tenant="bench", name="bench")
        print(f"{len(refs)} adapters committed; base {base.name}", flush=True)
        engine_cfg = EngineConfig(max_batch=32, max_active=args.max_active, max_cached=128, max_rank=8)

        results: dict[str, dict] = {}
        if not args.skip_local:
            print("local: lorafleet serve (one process) ...", flush=True)
            results["local"] = run_local(args, db_url, blob_url, admin, key, refs, engine_cfg)
        connect(num_cpus=4, object_store_mb=128)
        views = {}
        for replicas in (1, 2):
            print(f"ray x{replicas}: deploying ...", flush=True)
            results[f"ray x{replicas}"], views[replicas] = run_ray(args, replicas, db_url, blob_url, admin, key,
                                                                   refs, engine_cfg)
            print(f"ray x{replicas}: {results[f'ray x{replicas}']}", flush=True)
        import ray

        ray.shutdown()
        if not args.skip_local:  # the baseline again, after: how much did the machine's load move?
            print("local (again) ...", flush=True)
            results["local (again)"] = run_local(args, db_url, blob_url, admin, key, refs, engine_cfg)
        registry.close()

    one = results["ray x1"]["tok_s"]
    headers = ["configuration", "requests", "errors", "req/s", "completion tok/s", "vs ray x1", "p50 s", "p99 s",
               "affinity", "requests per replica", "startup s", "load avg (1 min)"]
    rows = []
    for name, r in results.items():
        rows.append([name, r["requests"], r["errors"], f"{r['req_s']:.2f}", f"{r['tok_s']:.1f}",
                     f"{r['tok_s'] / one:.2f}", f"{r['p50_s']:.2f}", f"{r['p99_s']:.2f}",
                     "—" if r["affinity"] is None else f"{r['affinity']:.0%}",
                     "—" if not r["split"] else " / ".join(map(str, r["split"])),
                     f"{r['startup_s']:.0f}" if "startup_s" in r else "—", r["load"]])
    show("throughput: 1 vs 2 engine replicas", headers, rows)

    view2 = views[2]
    load = view2.get("metrics", {}).get("histograms", {}).get("load_latency", {})
    load_p50_ms = load["p50_s"] * 1000 if load.get("p50_s") else None
    inputs = measured_inputs()
    model = []
    if None in (inputs["catalog_bytes"], inputs["ram_mb"], inputs["blob_mb"], inputs["slot_mb"]):
        print(f"capacity model skipped: a figure is missing from docs/results ({inputs})", flush=True)
    else:
        model = capacity_model(args, one, load_p50_ms, inputs)
    fleet_rows = [[rep["replica"].split("#")[-1], rep["routing"]["requests"], rep["routing"]["adapter_requests"],
                   rep["routing"]["affinity_hits"], rep["routing"]["lease_loads"], len(rep["multiplexed"]),
                   sum(1 for s in rep["slots"] if s["digest"])] for rep in view2["replicas"]]
    fleet_md = markdown_table(["replica", "requests (whole run, priming included)", "with adapter", "affinity hits",
                               "leases loaded",
                               "multiplexed now", "slots used"], fleet_rows)
    setup = (f"{args.clients} closed-loop HTTP clients; every adapter requested once first (priming, not counted), "
             f"then {args.warmup:.0f} s warm-up and {args.seconds:.0f} s measured "
             f"per configuration; {args.adapters} rank-8 attention adapters, Zipf s={args.zipf}; greedy, "
             f"max_tokens={args.max_tokens}; base {args.base}; engine batch 32, 32 slots, 128 cached; one torch thread "
             f"per process; each Ray engine replica reserves 1 CPU, max_ongoing_requests = ceil(clients / replicas). "
             f"Registry on PostgreSQL 15 (TempPostgres), blobs in a shared directory. Total run "
             f"{(time.monotonic() - t_all) / 60:.1f} min.")
    sections = [("Throughput: 1 vs 2 replicas", markdown_table(headers, rows) + "\n\n" + setup),
                ("The 2-replica run, per replica (fleet view)", fleet_md)]
    sections += model
    if args.quick:  # a smoke run: print, do not overwrite the recorded result
        for heading, text in sections:
            print(f"\n## {heading}\n\n{text}")
        return
    write_result("ray_scale", "Scale-out on Ray Serve", sections)


if __name__ == "__main__":
    main()
