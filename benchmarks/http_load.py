"""A bounded load run against a real `lorafleet serve` on loopback.

    python benchmarks/http_load.py                 # hostile mix: 2,400 requests from 3 tenants, SmolLM2
    python benchmarks/http_load.py --quick         # the same mix on the tiny model (no results file)
    python benchmarks/http_load.py --streaming     # 64 streaming clients x 60 s over 100 adapters (Zipf)

The server runs in this process (uvicorn in a thread, the real app and engine); only 127.0.0.1 is contacted.

Hostile mix (default): 12 client threads send a fixed, seeded list of requests from 3 tenants — good chats on
their own adapters and model listings, malformed bodies (bad JSON, wrong types, out-of-range fields, unknown
models, bad keys), another tenant's adapter, and oversized bodies (declared over the limit, and chunked with no
Content-Length) — while a probe polls ``/health`` every 50 ms. Reported: status codes per kind, 5xx, lost
(sent, never answered), cross-tenant bytes (a response carrying another tenant's name or digest that its request
did not), ``/health`` p50/p99/max, process RSS before and after.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=None, help="client threads (64 streaming, 12 hostile)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    parser.add_argument("--streaming", action="store_true", help="the streaming Zipf run instead of the hostile mix")
    parser.add_argument("--requests", type=int, default=2400, help="hostile mix: requests in all (bounded)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.streaming:
        args.clients = args.clients or 12
        hostile(args)
        return
    args.clients = args.clients or 64
    if args.quick:
        args.clients, args.seconds, args.adapters = 8, 10.0, 20

    import openai
    from _common import markdown_table, show, write_result

    from lorafleet.api.service import Service
    from lorafleet.base import load_base
    from lorafleet.registry import Registry
    from lorafleet.serving.engine import Engine
    from lorafleet.serving.params import EngineConfig
    from lorafleet.serving.sources import registry_fetch
    from lorafleet.testing.harness import LoopbackServer as Server
    from lorafleet.testing.harness import commit_live

    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-load-"))
    reg = Registry(f"sqlite:///{tmp / 'reg.db'}", str(tmp / "blobs"))
    base = load_base("tiny" if args.quick else None)
    refs = [f"load/u{i:04d}/style" for i in range(args.adapters)]
    for i, ref in enumerate(refs):
        commit_live(reg, base, ref, seed=i, rank=8)
    config = EngineConfig(max_batch=32, max_active=32, max_cached=128, max_rank=8)
    service = Service(reg, base, Engine(base, registry_fetch(reg), config))
    _, key = service.keys.create(tenant="load")

    ranks = np.arange(1, args.adapters + 1, dtype=float)
    probs = ranks ** -args.zipf
    probs /= probs.sum()
    latencies, ttfts, tokens, errors, sent, done = [], [], [], [], [0], [0]
    lock = threading.Lock()

    def client_loop(cid: int, url: str, stop_at: float) -> None:
        rng = np.random.default_rng(cid)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)
        while time.monotonic() < stop_at:
            ref = refs[int(rng.choice(args.adapters, p=probs))]
            with lock:
                sent[0] += 1
            start = time.perf_counter()
            first, n = None, 0
            try:
                stream = client.chat.completions.create(
                    model=ref, messages=[{"role": "user", "content": f"Tell me about topic {cid}."}],
                    max_tokens=args.max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content and first is None:
                        first = time.perf_counter() - start
                    if chunk.usage is not None:
                        n = chunk.usage.completion_tokens
                with lock:
                    latencies.append(time.perf_counter() - start)
                    ttfts.append(first if first is not None else time.perf_counter() - start)
                    tokens.append(n)
                    done[0] += 1
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    done[0] += 1

    with Server(service) as srv:
        # warm-up: one request so model weights and code paths are hot
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0).chat.completions.create(
            model=refs[0], messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        start = time.monotonic()
        stop_at = start + args.seconds
        threads = [threading.Thread(target=client_loop, args=(i, srv.url, stop_at)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.seconds + 600)
        wall = time.monotonic() - start
        snap = service.engine.metrics_snapshot()

    def pct(xs, q):
        return f"{np.percentile(xs, q) * 1000:.0f} ms" if xs else "n/a"

    headers = ["clients", "seconds", "adapters (Zipf s)", "requests", "req/s", "tokens/s", "latency p50", "latency p99",
               "TTFT p50", "TTFT p99", "errors", "lost", "adapter hit rate"]
    row = [args.clients, f"{wall:.0f}", f"{args.adapters} ({args.zipf})", len(latencies),
           f"{len(latencies) / wall:.2f}", f"{sum(tokens) / wall:.1f}", pct(latencies, 50), pct(latencies, 99),
           pct(ttfts, 50), pct(ttfts, 99), len(errors), sent[0] - done[0],
           f"{snap['hit_rate']:.3f}" if snap["hit_rate"] is not None else "n/a"]
    title = f"HTTP load on loopback: {base.name}, streaming chat, max_tokens {args.max_tokens}"
    show(title, headers, [row])
    if errors:
        print("first errors:", errors[:5])
    notes = ("Target: zero errors and zero lost requests. The load generator (64 client threads) shares the 2 CPU "
             "cores with the server, so absolute rates understate a dedicated server.")
    if not args.quick:
        write_result("http_load", title, [("Results", markdown_table(headers, [row]))], notes)
    reg.close()


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _plan(rng, n: int, tenants: dict, limit: int) -> list[dict]:
    """The seeded request list: (kind, tenant, method, path, body/headers, the statuses that are right)."""
    import json

    # Over the body limit while every field is within its own limit (256 messages of limit/200 characters each):
    # only the body limit can refuse it.
    many = [{"role": "user", "content": "x" * (limit // 200)} for _ in range(256)]
    malformed = [
        ("bad_json", b"{not json", {}),
        ("messages_type", json.dumps({"model": "{own}", "messages": 5}).encode(), {}),
        ("content_type", json.dumps({"model": "{own}", "messages": [{"role": "user", "content": 7}]}).encode(), {}),
        ("temperature", json.dumps({"model": "{own}", "messages": [{"role": "user", "content": "hi"}],
                                    "temperature": 5}).encode(), {}),
        ("max_tokens", json.dumps({"model": "{own}", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": -1}).encode(), {}),
        ("no_model", json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), {}),
        ("unknown_model", json.dumps({"model": "{tenant}/nobody/none", "messages": [
            {"role": "user", "content": "hi"}]}).encode(), {}),
        ("bad_address", json.dumps({"model": "../../etc/passwd", "messages": [
            {"role": "user", "content": "hi"}]}).encode(), {}),
        ("empty_messages", json.dumps({"model": "{own}", "messages": []}).encode(), {}),
        ("array_body", b"[1, 2, 3]", {}),
        ("feedback_bad", json.dumps({"response_id": "", "rating": 9}).encode(), {"path": "/v1/feedback"}),
    ]
    kinds = (["good_chat"] * 20 + ["models"] * 10 + ["malformed"] * 40 + ["cross_tenant"] * 12 + ["bad_key"] * 6
             + ["oversized"] * 8 + ["oversized_chunked"] * 4)
    names = sorted(tenants)
    plan = []
    for _ in range(n):
        kind = kinds[int(rng.integers(len(kinds)))]
        tenant = names[int(rng.integers(len(names)))]
        own = tenants[tenant]["refs"][int(rng.integers(len(tenants[tenant]["refs"])))]
        item = {"kind": kind, "tenant": tenant, "method": "POST", "path": "/v1/chat/completions", "body": None,
                "chunked": False, "key": tenants[tenant]["key"], "mentions": {tenant}}
        if kind == "good_chat":
            item["body"] = json.dumps({"model": own, "messages": [{"role": "user", "content": "Say hi."}],
                                       "max_tokens": 2, "temperature": 0}).encode()
            item["ok"] = {200}
        elif kind == "models":
            item.update(method="GET", path="/v1/models", ok={200})
        elif kind == "malformed":
            name, body, extra = malformed[int(rng.integers(len(malformed)))]
            item["kind"] = f"malformed:{name}"
            item["body"] = body.replace(b"{own}", own.encode()).replace(b"{tenant}", tenant.encode())
            item["path"] = extra.get("path", item["path"])
            item["ok"] = {400, 404, 422}
        elif kind == "cross_tenant":
            other = names[(names.index(tenant) + 1 + int(rng.integers(len(names) - 1))) % len(names)]
            ref = tenants[other]["refs"][0]
            item["body"] = json.dumps({"model": ref, "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 2}).encode()
            item["mentions"] = {tenant, other}  # the request names the other tenant's ref; the answer must not add
            item["ok"] = {404}
        elif kind == "bad_key":
            item["key"] = "lf-forged-" + "0" * 24
            item["body"] = json.dumps({"model": own, "messages": [{"role": "user", "content": "hi"}]}).encode()
            item["ok"] = {401}
        elif kind == "oversized":
            item["body"] = json.dumps({"model": own, "messages": many}).encode()
            item["ok"] = {413}
        else:  # oversized_chunked: no Content-Length, the limit must hold while streaming
            item["body"] = json.dumps({"model": own, "messages": many}).encode()
            item["chunked"] = True
            item["ok"] = {413}
        plan.append(item)
    return plan


def hostile(args) -> None:
    import queue as queue_mod

    import httpx
    from _common import markdown_table, show, write_result

    from lorafleet.api.service import Limits, Service
    from lorafleet.base import load_base
    from lorafleet.registry import Registry
    from lorafleet.serving.engine import Engine
    from lorafleet.serving.params import EngineConfig
    from lorafleet.serving.sources import registry_fetch
    from lorafleet.testing.harness import LoopbackServer as Server
    from lorafleet.testing.harness import commit_live

    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-hostile-"))
    reg = Registry(f"sqlite:///{tmp / 'reg.db'}", str(tmp / "blobs"))
    base = load_base("tiny" if args.quick else None)
    limits = Limits()
    service = Service(reg, base, Engine(base, registry_fetch(reg), EngineConfig(max_batch=16, max_active=12,
                                                                                 max_cached=16, max_rank=8)),
                      limits=limits)
    tenants: dict = {}
    for t, name in enumerate(("acme", "globex", "initech")):
        refs = [f"{name}/user{i}/style" for i in range(4)]
        digests = [commit_live(reg, base, ref, seed=10 * t + i, rank=4) for i, ref in enumerate(refs)]
        tenants[name] = {"refs": refs, "digests": digests, "key": service.keys.create(tenant=name)[1]}
    # What would betray another tenant in a response: its name, its adapters' digests (and their 12-char prefixes)
    markers = {name: [name.encode()] + [d.encode() for d in v["digests"]] + [d[:12].encode() for d in v["digests"]]
               for name, v in tenants.items()}
    plan = _plan(np.random.default_rng(args.seed), args.requests, tenants, limits.max_body_bytes)

    work: queue_mod.Queue = queue_mod.Queue()
    for i, item in enumerate(plan):
        work.put((i, item))
    results: list = [None] * len(plan)
    health: list[float] = []
    stop = threading.Event()

    def chunks(body: bytes):
        for k in range(0, len(body), 64 * 1024):
            yield body[k:k + 64 * 1024]

    def client_loop(url: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while True:
                try:
                    i, item = work.get_nowait()
                except queue_mod.Empty:
                    return
                headers = {"authorization": f"Bearer {item['key']}", "content-type": "application/json"}
                content = chunks(item["body"]) if item["chunked"] else item["body"]
                t0 = time.perf_counter()
                try:
                    r = client.request(item["method"], item["path"], content=content, headers=headers)
                    results[i] = (r.status_code, r.content, time.perf_counter() - t0)
                except httpx.HTTPError as exc:  # the server dropped it (a reset after 413 counts as answered)
                    results[i] = ("dropped", f"{type(exc).__name__}: {exc}".encode(), time.perf_counter() - t0)

    def probe(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    client.get("/health").raise_for_status()
                    health.append(time.perf_counter() - t0)
                except httpx.HTTPError:
                    health.append(float("inf"))
                stop.wait(0.05)

    with Server(service) as srv:
        warm = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120,
                          headers={"authorization": f"Bearer {tenants['acme']['key']}"},
                          json={"model": tenants["acme"]["refs"][0], "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 2})
        warm.raise_for_status()
        rss_before = _rss_mb()
        prober = threading.Thread(target=probe, args=(srv.url,), daemon=True)
        prober.start()
        start = time.monotonic()
        threads = [threading.Thread(target=client_loop, args=(srv.url,)) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=1800)
        wall = time.monotonic() - start
        stop.set()
        prober.join(timeout=30)
        rss_after = _rss_mb()

    by_kind: dict[str, dict] = {}
    five_xx = lost = wrong = leaks = dropped = 0
    examples: list[str] = []
    for item, res in zip(plan, results, strict=True):
        kind = item["kind"].split(":")[0]
        entry = by_kind.setdefault(kind, {"n": 0, "statuses": {}})
        entry["n"] += 1
        if res is None:
            lost += 1
            continue
        status, body, _ = res
        entry["statuses"][status] = entry["statuses"].get(status, 0) + 1
        if status == "dropped":
            dropped += 1
            if kind != "oversized_chunked":
                wrong += 1
            continue
        if status >= 500:
            five_xx += 1
        if status not in item["ok"]:
            wrong += 1
            if len(examples) < 5:
                examples.append(f"{item['kind']}: {status} {body[:160]!r}")
        for other, marks in markers.items():
            if other in item["mentions"]:
                continue
            if any(m in body for m in marks):
                leaks += 1
    lat = np.array([h for h in health if np.isfinite(h)]) * 1000
    failed_probes = sum(1 for h in health if not np.isfinite(h))

    def pct(q):
        return f"{np.percentile(lat, q):.1f} ms" if len(lat) else "n/a"

    mix_headers = ["kind", "requests", "status codes"]
    mix_rows = [[k, v["n"], ", ".join(f"{s}: {c}" for s, c in sorted(v["statuses"].items(), key=str))]
                for k, v in sorted(by_kind.items())]
    headers = ["requests", "tenants", "clients", "seconds", "5xx", "lost", "not the right status",
               "cross-tenant bytes", "/health probes", "/health p50", "/health p99", "/health max",
               "RSS before", "RSS after"]
    row = [len(plan), len(tenants), args.clients, f"{wall:.0f}", five_xx, lost, wrong, leaks,
           f"{len(health)} ({failed_probes} failed)", pct(50), pct(99), f"{lat.max():.1f} ms" if len(lat) else "n/a",
           f"{rss_before:.0f} MB", f"{rss_after:.0f} MB"]
    title = f"HTTP hostile mix on loopback: {base.name}, 3 tenants, {len(plan)} requests"
    show(title, headers, [row])
    show("status codes per kind", mix_headers, mix_rows)
    if examples:
        print("unexpected statuses:", *examples, sep="\n  ")
    notes = (f"Seeded plan (--seed {args.seed}): good chats (max_tokens 2) and /v1/models listings, 11 malformed "
             "shapes, another tenant's adapter (must be 404), forged keys (401), bodies over the "
             f"{limits.max_body_bytes // (1024 * 1024)} MiB limit declared (Content-Length) and chunked (no length: "
             "the limit must hold while streaming). 'not the right status' counts answers outside each kind's "
             "expected set; 'cross-tenant bytes' counts responses carrying another tenant's name or adapter digest "
             "that the request did not name. RSS is this process (server and client threads together). "
             "The machine is shared: 2 CPU cores with other helpers' test runs and benchmarks "
             "(load average noted below), so latencies are upper bounds.")
    if not args.quick:
        notes += f" Load average at the end: {' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}."
        write_result("http_load", title, [("Results", markdown_table(headers, [row])),
                                          ("Status codes per kind", markdown_table(mix_headers, mix_rows))], notes)
    reg.close()


if __name__ == "__main__":
    main()
