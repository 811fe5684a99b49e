"""A bounded load run against a real `lorafleet serve` on loopback.

    python benchmarks/http_load.py                 # 64 clients x 60 s over 100 adapters (Zipf), SmolLM2
    python benchmarks/http_load.py --quick         # tiny model, 8 clients x 10 s

The server runs in this process (uvicorn in a thread, the real app and engine); the clients are the official
`openai` package, streaming, one thread each, each request a Zipf-drawn user's adapter. Every client stops by
itself after --seconds; only 127.0.0.1 is contacted. Reported: requests/s, completion tokens/s, latency and
time-to-first-token p50/p99, errors, and requests lost (sent but never answered).
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
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
