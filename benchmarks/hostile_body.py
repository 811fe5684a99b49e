"""Hostile request bodies against a real server on loopback: how fast they are refused, and what they cost others.

    python benchmarks/hostile_body.py               # 40 rounds of each attack, tiny base
    python benchmarks/hostile_body.py --quick       # 3 rounds of each

Attacks (issue 20, item 1), each sent over a raw socket as fast as the server reads it:
  * a 48 MB and a 7 MB ``Transfer-Encoding: chunked`` chat body (messages each within the field limits);
  * a 3.9 MB chat body within the body limit whose 256 messages hold 3.84 M characters (refused by the
    character count, before any tokenizer runs).
Meanwhile a client polls ``/health`` every 5 ms. Attacker and prober are separate processes. Reported: time to the refusal (first body byte sent → status
line), bytes the server took, /health p50/p99/max during the attacks and alone, and the RSS growth of the
server process (it runs in this process: uvicorn in a thread, the real app). Only 127.0.0.1 is contacted.
Targets: 48 MB refused in < 100 ms, /health p99 < 50 ms during it, RSS growth < 50 MB.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

MB = 1024 * 1024


def _probe(url: str, stop, out) -> None:
    """Child process: poll /health every 5 ms until ``stop``; put (latencies, failures) on ``out``."""
    import httpx

    latencies, failures = [], 0
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            t = time.perf_counter()
            failures += client.get("/health").status_code != 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.005)
    out.put((latencies, failures))


def _attack(port: int, rounds: int, total: int, content_chars: int, headers: dict, out) -> None:
    """Child process: send the body ``rounds`` times; put [(status, seconds, bytes taken)] on ``out``."""
    from lorafleet.testing.hostile import chat_body, send_chunked

    results = []
    for _ in range(rounds):
        r = send_chunked(port, "/v1/chat/completions", chat_body(total, "acme/alice/style", content_chars),
                         headers=headers)
        results.append((r.status, r.seconds, r.sent))
    out.put(results)


class HealthProbe:
    """/health polled from another process (the server process runs only the server meanwhile)."""

    def __init__(self, ctx, url: str) -> None:
        self.stop, self.out = ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=_probe, args=(url, self.stop, self.out), daemon=True)

    def __enter__(self) -> HealthProbe:
        self.proc.start()
        time.sleep(1.0)  # the child's imports
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.latencies, self.failures = self.out.get(timeout=60)
        self.proc.join(30)


def ms(values: list[float], q: float) -> str:
    return f"{float(np.percentile(values, q)) * 1000:.1f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="3 rounds of each attack")
    parser.add_argument("--base", default="tiny", help="the base model (the attacks are refused before it runs)")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 3

    from _common import markdown_table, show, write_result

    from lorafleet.api.service import Service
    from lorafleet.base import load_base
    from lorafleet.registry import Registry
    from lorafleet.serving.engine import Engine
    from lorafleet.serving.params import EngineConfig
    from lorafleet.serving.sources import registry_fetch
    from lorafleet.testing.harness import LoopbackServer, commit_live
    from lorafleet.testing.hostile import chat_body, rss_bytes, send_chunked

    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-hostile-"))
    reg = Registry(f"sqlite:///{tmp / 'reg.db'}", str(tmp / "blobs"))
    base = load_base(args.base)
    commit_live(reg, base, "acme/alice/style", seed=1)
    service = Service(reg, base, Engine(base, registry_fetch(reg), EngineConfig(max_batch=8, max_active=4)))
    _, key = service.keys.create(tenant="acme")
    headers = {"Authorization": f"Bearer {key}"}
    attacks = [  # (name, body bytes, characters per message, expected status)
        ("48 MB chunked chat body", 48 * MB, 60_000, 413),
        ("7 MB chunked chat body", 7 * MB, 60_000, 413),
        ("3.9 MB body, 3.84 M prompt characters", 3_840_000, 15_000, 400),
    ]
    ctx = multiprocessing.get_context("spawn")
    rows, health_rows = [], []
    load = [os.getloadavg()[0]]
    with LoopbackServer(service) as srv:
        with HealthProbe(ctx, srv.url) as idle:  # /health alone, for reference
            time.sleep(2.0)
        send_chunked(srv.port, "/v1/chat/completions", chat_body(1 * MB, "acme/alice/style"), headers=headers)  # warm-up
        rss0 = rss_bytes()
        for name, total, chars, expected in attacks:
            out = ctx.Queue()
            attacker = ctx.Process(target=_attack, args=(srv.port, args.rounds, total, chars, headers, out))
            with HealthProbe(ctx, srv.url) as probe:
                attacker.start()
                results = out.get(timeout=600)
                attacker.join(30)
            statuses, times, sent = zip(*results, strict=True)
            wrong = sum(s != expected for s in statuses)
            rows.append([name, f"{expected}" + (f" ({wrong} other)" if wrong else ""), args.rounds,
                         ms(times, 50), f"{max(times) * 1000:.1f}", f"{max(sent) / MB:.1f}"])
            health_rows.append([f"during: {name}", len(probe.latencies), ms(probe.latencies, 50),
                                ms(probe.latencies, 99), ms(probe.latencies, 100), probe.failures])
        grown = (rss_bytes() - rss0) / MB
        load.append(os.getloadavg()[0])
        health_rows.insert(0, ["alone (2 s)", len(idle.latencies), ms(idle.latencies, 50), ms(idle.latencies, 99),
                               ms(idle.latencies, 100), idle.failures])
    reg.close()

    h1 = ["attack", "answer", "rounds", "refused p50 ms", "refused max ms", "MB taken (max)"]
    h2 = ["/health", "requests", "p50 ms", "p99 ms", "max ms", "failed"]
    show("refusals", h1, rows)
    show("/health", h2, health_rows)
    print(f"RSS growth over all attacks: {grown:.1f} MB")
    limits = service.limits
    notes = (f"Limits: max_body_bytes {limits.max_body_bytes}, max_prompt_chars {limits.max_prompt_chars}, "
             f"max_prompt_tokens {limits.max_prompt_tokens}. The server runs in this process on loopback (uvicorn "
             f"in a thread, base `{base.name}`); the attacker and the /health prober are two other processes. RSS "
             f"growth of the server process over all attacks: "
             f"**{grown:.1f} MB** (target < 50 MB). Targets: 48 MB chunked refused < 100 ms, /health p99 < 50 ms "
             "during it. The machine was shared with other jobs (2 cores; load average "
             f"{load[0]:.1f} / {load[1]:.1f} at the start / end), so latencies include their noise: compare "
             "/health during an attack with /health alone in the same run.")
    write_result("hardening", "Hostile request bodies (issue 20, item 1)",
                 [("Refusals", markdown_table(h1, rows)), ("/health while under attack", markdown_table(h2, health_rows))],
                 notes)


if __name__ == "__main__":
    main()
