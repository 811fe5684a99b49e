"""Serving benchmark: the engine against peft and transformers, residency under load, and the machine's ceiling.

Everything is measured side by side in one run on the real base (SmolLM2-135M-Instruct, float32, CPU):

a) decode throughput with K distinct rank-8 adapters in flight (batch 32) relative to the same engine with none
b) the engine against peft's mixed-adapter ``generate(adapter_names=...)`` (same K, batch, prompts, tokens), and
   base-only against plain transformers ``generate`` (uniform and mixed completion lengths)
c) cold load of a rank-8 adapter from the local blob store (the registry's, else files) to compute-ready, and
   warm-request throughput while a stream of cold loads runs
d) a Zipf trace over 10,000 adapters with max_cached=256: hit rate and throughput, SLRU against plain LRU
e) the ceiling: matmul GFLOP/s of this machine, and the fraction of it the engine reaches in decode and prefill
+  memory: bytes per resident adapter, 128 active rank-8 adapters

    python benchmarks/serving_bench.py --quick     # small sizes, about a minute
    python benchmarks/serving_bench.py             # full, writes docs/results/serving.md
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.base import load_base
from lorafleet.serving.engine import Engine, EngineConfig, SamplingParams
from lorafleet.serving.residency import READY, LRUPolicy, SLRUPolicy
from lorafleet.serving.sources import DictBlobs, DirBlobs

ROOT = Path(__file__).resolve().parents[1]
console = Console()

SIZES = {
    "quick": {
        "ks": [1, 8], "requests": 32, "prompt": 8, "new": 4, "peft_ks": [8], "cold_loads": 8,
        "burst_requests": 32, "zipf_adapters": 300, "zipf_requests": 64, "zipf_sim_requests": 20_000,
        "zipf_warmup": 300, "zipf_cached": 64, "mixed_requests": 64, "prefill_prompt": 32, "reps": 1,
        "burst_reps": 1, "burst_loads": 32,
    },
    "full": {
        "ks": [1, 8, 32, 128], "requests": 64, "prompt": 8, "new": 16, "peft_ks": [1, 8, 32, 128], "cold_loads": 40,
        "burst_requests": 64, "zipf_adapters": 10_000, "zipf_requests": 640, "zipf_sim_requests": 200_000,
        "zipf_warmup": 5000,
        "zipf_cached": 256, "mixed_requests": 96, "prefill_prompt": 128, "reps": 2,
        "burst_reps": 3, "burst_loads": 64,
    },
}
BATCH = 32
RANK = 8


# -- helpers ---------------------------------------------------------------------------------------------------


def hist_sum(snapshot: dict, name: str) -> float:
    return snapshot["histograms"][name]["sum_s"]


def prompts_for(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 20_000), (n, length), generator=g).tolist()


def make_adapters(base, n: int, targets: str, seed0: int = 0) -> list[LoraAdapter]:
    return [LoraAdapter.create(base, LoraSpec(rank=RANK, alpha=2 * RANK, target_modules=targets), seed=seed0 + i,
                               init="random") for i in range(n)]


def wait_ready(engine: Engine, digests: list[str], timeout: float = 300.0) -> None:
    engine.prefetch(digests)
    deadline = time.monotonic() + timeout
    while any(engine.residency.state(d) != READY for d in digests):
        if time.monotonic() > deadline:
            raise TimeoutError("adapters did not load")
        engine.step()
        time.sleep(0.002)


def run_engine(engine: Engine, prompts, adapters, new: int, max_tokens: list[int] | None = None) -> dict:
    """Generate through the engine; wall time plus the decode/prefill time split from its metrics."""
    before = engine.metrics_snapshot()
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (max_tokens or [new] * len(prompts))]
    t0 = time.perf_counter()
    results = engine.generate(prompts, adapters, params)
    wall = time.perf_counter() - t0
    after = engine.metrics_snapshot()
    tokens = sum(r.completion_tokens for r in results)
    decode_tokens = after["counters"]["tokens_generated"] - before["counters"]["tokens_generated"] - len(prompts)
    decode_s = hist_sum(after, "decode_step") - hist_sum(before, "decode_step")
    prefill_s = hist_sum(after, "prefill_chunk") - hist_sum(before, "prefill_chunk")
    return {
        "wall": wall, "tokens": tokens, "tok_s": tokens / wall, "decode_s": decode_s, "prefill_s": prefill_s,
        "decode_tok_s": decode_tokens / decode_s if decode_s else float("nan"),
        "errors": sum(not r.ok for r in results), "results": results,
    }


def hf_generate(model, prompts, new: int, adapter_names=None, batch: int = BATCH) -> dict:
    """transformers generate in static batches of ``batch`` (peft when ``adapter_names`` is given)."""
    cfg = copy.deepcopy(model.generation_config)
    cfg.eos_token_id, cfg.pad_token_id, cfg.max_new_tokens, cfg.do_sample = [10**9], 0, new, False
    outputs, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i : i + batch], device=next(model.parameters()).device)
        extra = {} if adapter_names is None else {"adapter_names": adapter_names[i : i + batch]}
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg, **extra)
        outputs.extend(out[:, ids.shape[1] :].tolist())
    wall = time.perf_counter() - t0
    return {"wall": wall, "tokens": len(prompts) * new, "tok_s": len(prompts) * new / wall, "outputs": outputs}


def peft_with_adapters(plain, adapters: list[LoraAdapter]):
    """A PeftModel holding ``adapters`` as ``a0, a1, ...``.

    ``load_adapter`` rescans every module of the model for each adapter, so loading n adapters is O(n^2)
    (~500 s for 128 here). Instead, each adapter is added to every peft LoRA layer directly with
    ``update_layer`` and its weights copied in: the same layers, the same forward (the benchmark checks that
    the outputs are identical to the engine's).
    """
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    spec = adapters[0].spec
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                        lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(plain, config, adapter_name="a0")
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            name = f"a{i}"
            if i:
                model.peft_config[name] = config
            for key, layer in layers.items():
                if i:
                    layer.update_layer(name, spec.rank, spec.alpha, config)
                A, B = adapter.weights[key]
                layer.lora_A[name].weight.copy_(A)
                layer.lora_B[name].weight.copy_(B)
    return model.eval()


def matmul_gflops(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - t0) / 1e9


def pick_threads(requested: str) -> dict:
    available = torch.get_num_threads()
    options = sorted({1, available})
    measured = {}
    for t in options:
        torch.set_num_threads(t)
        measured[t] = matmul_gflops(BATCH, 576, 1536, 0.7)
    best = max(measured, key=measured.get) if requested == "auto" else int(requested)
    torch.set_num_threads(best)
    return {"threads": best, "measured": measured}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def fmt(x, digits=1):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{digits}f}"


class Report:
    """Sections of rows, printed as rich tables and written as markdown."""

    def __init__(self) -> None:
        self.sections: list[tuple[str, list[str], list[list[str]], str]] = []

    def add(self, title: str, columns: list[str], rows: list[list], note: str = "") -> None:
        rows = [[str(c) for c in r] for r in rows]
        self.sections.append((title, columns, rows, note))
        table = Table(title=title, title_justify="left")
        for c in columns:
            table.add_column(c, justify="right" if c != columns[0] else "left")
        for r in rows:
            table.add_row(*r)
        console.print(table)
        if note:
            console.print(f"[dim]{note}[/dim]")

    def markdown(self) -> str:
        out = []
        for title, columns, rows, note in self.sections:
            out += [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            out += ["| " + " | ".join(r) + " |" for r in rows]
            if note:
                out += ["", note]
            out.append("")
        return "\n".join(out)


# -- sections ----------------------------------------------------------------------------------------------------


def section_throughput(base, plain_peft, hf_plain, size, targets, report: Report, ceiling: dict) -> None:
    """a) K adapters vs none, b) vs peft mixed-adapter generate and plain transformers generate."""
    vocab = base.config.vocab_size
    kmax = max(size["ks"])
    adapters = make_adapters(base, kmax, targets)
    blobs = DictBlobs()
    digests = [blobs.put(a) for a in adapters]
    engine = Engine(base, blobs, EngineConfig(max_batch=BATCH, max_active=BATCH, max_cached=max(256, kmax),
                                              max_rank=RANK))
    wait_ready(engine, digests)
    warm = prompts_for(BATCH, size["prompt"], 99, vocab)  # the same warm-up for every system: one batch, 2 tokens
    engine.generate(warm, [digests[i % kmax] for i in range(BATCH)], SamplingParams(max_tokens=2, ignore_eos=True))
    hf_generate(hf_plain, warm, 2)

    workloads = {}
    for k in size["ks"]:
        n = max(size["requests"], k)
        workloads[k] = (n, prompts_for(n, size["prompt"], 1000 + n, vocab))
    base_runs: dict[int, dict] = {}
    rows, peft_rows = [], []
    engine_runs: dict[int, dict] = {}
    def best(old, new):  # best of the repetitions: the least disturbed by other jobs on the machine
        if old is None:
            return new
        return {key: max(old[key], new[key]) if key in ("tok_s", "decode_tok_s") else old[key] for key in old}

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("a) engine: K adapters vs none", total=len(size["ks"]) * 2 * size["reps"])
        for _ in range(size["reps"]):  # interleaved: no adapters, K..., per workload size
            done_sizes = set()
            for k in size["ks"]:
                n, prompts = workloads[k]
                if n not in done_sizes:
                    done_sizes.add(n)
                    base_runs[n] = best(base_runs.get(n), run_engine(engine, prompts, None, size["new"]))
                progress.advance(task)
                names = [digests[i % k] for i in range(n)]  # rows cycle through the K adapters
                engine_runs[k] = best(engine_runs.get(k), run_engine(engine, prompts, names, size["new"]))
                progress.advance(task)
    for k in size["ks"]:
        n = workloads[k][0]
        run, b = engine_runs[k], base_runs[n]
        rows.append([k, n, fmt(run["tok_s"]), fmt(b["tok_s"]), fmt(run["tok_s"] / b["tok_s"], 2),
                     fmt(run["decode_tok_s"]), fmt(b["decode_tok_s"]), fmt(run["decode_tok_s"] / b["decode_tok_s"], 2),
                     run["errors"]])
    report.add(
        f"a) Decode throughput with K distinct rank-{RANK} adapters ({targets}) in flight, batch {BATCH}",
        ["K", "requests", "engine tok/s", "no-adapter tok/s", "ratio", "decode tok/s", "no-adapter decode tok/s",
         "decode ratio (target ≥ 0.8 at K=32)", "errors"],
        rows,
        f"Each request: {size['prompt']} prompt tokens, {size['new']} new tokens (EOS ignored). tok/s counts all "
        "completion tokens over the wall time (prefill included); decode tok/s counts tokens of decode steps over "
        "the time spent in decode steps. Rows cycle through the K adapters (K=128 with batch 32: each wave uses 32 of "
        f"them, slots are reloaded between waves). All adapters were loaded into RAM before timing. Runs are "
        f"interleaved (no adapters, then each K, repeated), best of {size['reps']} shown.",
    )
    ceiling["decode"] = max(r["decode_tok_s"] for r in base_runs.values())

    # b) peft mixed-adapter generate, same K, batch, prompts and tokens
    if plain_peft is not None and size["peft_ks"]:
        need = max(size["peft_ks"])
        with console.status(f"b) loading {need} adapters into peft"):
            t0 = time.perf_counter()
            peft_model = peft_with_adapters(plain_peft, adapters[:need])
            load_s = time.perf_counter() - t0
        peft_model.eval()
        hf_generate(peft_model, warm, 2, adapter_names=[f"a{i % need}" for i in range(BATCH)])  # the engine's warm-up
        peft_runs: dict[int, dict] = {}
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("b) peft mixed-adapter generate", total=len(size["peft_ks"]) * size["reps"])
            for _ in range(size["reps"]):  # the engine's repetitions, best shown for both
                for k in size["peft_ks"]:
                    n, prompts = workloads[k]
                    names = [f"a{i % k}" for i in range(n)]
                    p = hf_generate(peft_model, prompts, size["new"], adapter_names=names)
                    if k not in peft_runs or p["tok_s"] > peft_runs[k]["tok_s"]:
                        peft_runs[k] = p
                    progress.advance(task)
        for k in size["peft_ks"]:
            n, p = workloads[k][0], peft_runs[k]
            same = sum(a == b.token_ids for a, b in zip(p["outputs"], engine_runs[k]["results"], strict=True))
            peft_rows.append([k, n, fmt(engine_runs[k]["tok_s"]), fmt(p["tok_s"]),
                              fmt(engine_runs[k]["tok_s"] / p["tok_s"], 2), f"{same}/{n}"])
        report.add(
            "b) Engine vs peft mixed-adapter generate (same K, batch 32, prompts, tokens)",
            ["K", "requests", "engine tok/s", "peft tok/s", "engine / peft (target ≥ 3)", "identical outputs"],
            peft_rows,
            f"peft {_peft_version()}: a PeftModel holding the adapters (set up in {load_s:.0f} s, not counted), "
            "generate(adapter_names=...) in static batches of 32. Both end to end, prefill included. Both got the "
            f"same warm-up (one batch of {BATCH}, 2 new tokens) and the same repetitions ({size['reps']}), best shown; the "
            "engine's runs are those of a), made before peft's.",
        )
        del peft_model
        gc.collect()

    # b') base only: engine vs plain transformers generate
    n, prompts = workloads[size["ks"][0]]
    rng = random.Random(5)
    m = size["mixed_requests"]
    mixed_prompts = prompts_for(m, size["prompt"], 77, vocab)
    lengths = [rng.randint(2, 2 * size["new"]) for _ in range(m)]
    hf_tok, eng_tok, hf_mixed_tok, eng_mixed_tok = 0.0, 0.0, 0.0, 0.0
    for _ in range(size["reps"]):  # interleaved, best of reps
        hf = hf_generate(hf_plain, prompts, size["new"])
        eng = run_engine(engine, prompts, None, size["new"])
        hf_tok, eng_tok = max(hf_tok, hf["tok_s"]), max(eng_tok, eng["tok_s"])
        wall = 0.0
        for i in range(0, m, BATCH):  # each static batch must run until its longest request is done
            wall += hf_generate(hf_plain, mixed_prompts[i : i + BATCH], max(lengths[i : i + BATCH]))["wall"]
        hf_mixed_tok = max(hf_mixed_tok, sum(lengths) / wall)
        eng_mixed_tok = max(eng_mixed_tok, run_engine(engine, mixed_prompts, None, 0, max_tokens=lengths)["tok_s"])
    same = sum(a == r.token_ids for a, r in zip(hf["outputs"], eng["results"], strict=True))
    report.add(
        "b) Base only: engine vs plain transformers generate (batch 32)",
        ["workload", "requests", "engine tok/s", "transformers tok/s", "engine / transformers (target ≥ 1)",
         "identical outputs"],
        [
            [f"uniform: {size['new']} new tokens each", n, fmt(eng_tok), fmt(hf_tok), fmt(eng_tok / hf_tok, 2),
             f"{same}/{n}"],
            [f"mixed: 2..{2 * size['new']} new tokens", m, fmt(eng_mixed_tok), fmt(hf_mixed_tok),
             fmt(eng_mixed_tok / hf_mixed_tok, 2), "—"],
        ],
        "transformers: model.generate on an unwrapped copy of the base, static batches of 32. In the mixed "
        "workload a static batch runs until its longest request is done; only requested tokens are counted for both. "
        f"Both warmed up the same way (one batch of {BATCH}, 2 new tokens); interleaved, best of {size['reps']}.",
    )
    engine.close()


def section_cold(base, size, targets, report: Report) -> None:
    """c) cold load to compute-ready from the local blob store; warm throughput during a stream of cold loads."""
    tmp = tempfile.TemporaryDirectory()
    n_cold = size["cold_loads"]
    n_burst_pool = size["burst_loads"] * size["burst_reps"] + 96  # distinct, more than max_cached: all cold
    adapters = make_adapters(base, 8, targets, seed0=5000)
    cold = make_adapters(base, n_cold, targets, seed0=6000)
    try:
        from lorafleet.registry import Provenance, Registry  # noqa: PLC0415

        registry = Registry(f"sqlite:///{tmp.name}/registry.db", f"{tmp.name}/blobs")
        prov = Provenance(base_fingerprint=base.fingerprint)

        def put(i, a):
            return registry.commit(f"bench/u{i}/assistant", to_bytes(a), prov).digest

        fetch, store = registry.read_blob, "registry LocalBlobStore (sha256-verified by the registry)"
        verify = False  # the registry verifies the digest; do not hash twice
    except ImportError:
        files = DirBlobs(Path(tmp.name) / "blobs")

        def put(i, a):
            return files.put(a)

        fetch, store, verify = files, "files (DirBlobs), sha256-verified by the engine", True
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("c) writing adapters to the blob store", total=8 + n_cold + n_burst_pool)
        warm_d = []
        for i, a in enumerate(adapters):
            warm_d.append(put(i, a))
            progress.advance(task)
        cold_d = []
        for i, a in enumerate(cold):
            cold_d.append(put(1000 + i, a))
            progress.advance(task)
        burst_d = []
        proto = cold[0]
        for i in range(n_burst_pool):  # distinct digests: perturb one value of a shared adapter
            w = dict(proto.weights)
            name = next(iter(w))
            A, B = w[name]
            A = A.clone()
            A[0, 0] += (i + 1) * 1e-3
            w[name] = (A, B)
            burst_d.append(put(5000 + i, LoraAdapter(spec=proto.spec, weights=w)))
            progress.advance(task)
    blob_bytes = len(fetch(cold_d[0]))
    engine = Engine(base, fetch, EngineConfig(max_batch=BATCH, max_active=BATCH, max_cached=size["burst_loads"] + 16,
                                              max_rank=RANK, verify_digest=verify))
    # cold load -> compute-ready, one at a time (nothing else running)
    latencies = []
    for d in cold_d:
        t0 = time.perf_counter()
        state, _ = engine.residency.acquire(d)
        while state != READY:
            engine._wake.wait(0.01)
            engine._wake.clear()
            for digest, _, err in engine.residency.poll():
                if digest == d:
                    if err:
                        raise RuntimeError(err)
                    state = READY
        slot = engine.residency.activate(d)
        latencies.append(time.perf_counter() - t0)
        assert slot is not None
        engine.residency.deactivate(d)
        engine.residency.release(d)
    m = engine.metrics_snapshot()["histograms"]
    worker = m["load_latency"]
    slot_copy = m["slot_load_latency"]
    report.add(
        f"c) Cold load of a rank-{RANK} adapter ({targets}, {blob_bytes / 1e6:.2f} MB blob) to compute-ready",
        ["loads", "p50 ms (target < 20)", "p99 ms", "mean ms", "of which fetch+verify+parse (mean ms)",
         "slot copy (mean ms)"],
        [[len(latencies), fmt(1000 * pct(latencies, 0.5), 2), fmt(1000 * pct(latencies, 0.99), 2),
          fmt(1000 * statistics.mean(latencies), 2), fmt(1000 * worker["mean_s"], 2),
          fmt(1000 * slot_copy["mean_s"], 2)]],
        f"Source: {store}. Timed from acquire (cold) to the adapter sitting in a compute slot: worker-thread fetch, "
        "digest check, safetensors parse, shape/finiteness validation, hand-off to the engine thread, slot copy.",
    )

    # warm throughput while a burst of cold loads runs (loads never block decode)
    wait_ready(engine, warm_d)
    vocab = base.config.vocab_size
    n = size["burst_requests"]
    prompts = prompts_for(n, size["prompt"], 4242, vocab)
    names = [warm_d[i % len(warm_d)] for i in range(n)]
    engine.start()
    burst_size = size["burst_loads"]

    def window(burst: list[str] | None, seconds: float) -> tuple[float, float]:
        """Warm tokens/s over a window in the middle of a warm run: the burst's loads, or ``seconds``."""
        handles = [engine.submit(p, d, SamplingParams(max_tokens=size["new"], ignore_eos=True))
                   for p, d in zip(prompts, names, strict=True)]
        time.sleep(1.0)  # steady state
        before = engine.metrics_snapshot()["counters"]
        c0, t0 = before["tokens_generated"], time.perf_counter()
        if burst:  # until every load of the burst has finished (counted: early ones may be evicted by later ones)
            engine.prefetch(burst)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                c = engine.metrics_snapshot()["counters"]
                if c["loads_ok"] + c["load_failures"] - before["loads_ok"] - before["load_failures"] >= len(burst):
                    break
                time.sleep(0.002)
        else:
            time.sleep(seconds)
        c1, t1 = engine.metrics_snapshot()["counters"]["tokens_generated"], time.perf_counter()
        for h in handles:
            h.result()
        return (c1 - c0) / (t1 - t0), t1 - t0

    burst_rates, none_rates, windows = [], [], []
    for rep in range(size["burst_reps"]):  # alternated; a fresh set of cold adapters each time
        rate, seconds = window(burst_d[rep * burst_size : (rep + 1) * burst_size], 0)
        burst_rates.append(rate)
        windows.append(seconds)
        none_rates.append(window(None, seconds)[0])

    stop = threading.Event()
    loaded = [0]

    def stream():
        i = 0
        while not stop.is_set():
            c = engine.residency.counts()
            if c["loading"] + c["queued"] < 4:
                engine.prefetch([burst_d[i % len(burst_d)]])
                i += 1
                loaded[0] += 1
            time.sleep(0.001)

    stream_runs = {"none": [], "stream": []}
    for _ in range(size["reps"]):
        for mode in ("none", "stream"):
            thread = threading.Thread(target=stream) if mode == "stream" else None
            if thread:
                stop.clear()
                thread.start()
            stream_runs[mode].append(run_engine(engine, prompts, names, size["new"])["tok_s"])
            if thread:
                stop.set()
                thread.join()
    engine.stop()
    best_none, best_burst = max(none_rates), max(burst_rates)
    stream_none, stream_loaded = max(stream_runs["none"]), max(stream_runs["stream"])
    report.add(
        "c) Warm-request throughput while cold adapters load",
        ["scenario", "cold loads", "window s", "warm tok/s, no loads", "warm tok/s, loading", "ratio (target ≥ 0.9)"],
        [
            [f"burst of {burst_size} cold adapters", f"{burst_size} x {size['burst_reps']}",
             fmt(statistics.mean(windows), 2), fmt(best_none), fmt(best_burst), fmt(best_burst / best_none, 2)],
            ["sustained stream: 4 loads always in flight", loaded[0], "whole run", fmt(stream_none),
             fmt(stream_loaded), fmt(stream_loaded / stream_none, 2)],
        ],
        f"8 warm adapters, {n} requests, batch 32, engine loop in its thread. Burst: after 1 s of steady decoding, "
        f"{burst_size} cold adapters are requested at once (prefetch); warm tokens/s is measured over the window "
        "until all are loaded, and compared with a window of the same length without loads (alternated, best of "
        f"{size['burst_reps']} each). Stream: a thread keeps 4 loads in flight for whole runs (best of "
        f"{size['reps']}). Load workers run at nice 10; verify + parse one at a time (parse_workers=1), fetches up "
        "to 4 at once.",
    )
    engine.close()
    tmp.cleanup()


def zipf_trace(n_items: int, n_requests: int, s: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1.0 / (k**s) for k in range(1, n_items + 1)]
    ranks = rng.choices(range(n_items), weights=weights, k=n_requests)
    perm = list(range(n_items))
    rng.shuffle(perm)
    return [perm[r] for r in ranks]


def simulate(policy_cls, capacity: int, trace: list[int]) -> float:
    policy = policy_cls(capacity) if policy_cls is LRUPolicy else policy_cls(capacity, 0.8)
    resident, hits = set(), 0
    for key in trace:
        if key in resident:
            hits += 1
            policy.touch(key)
            continue
        if len(resident) >= capacity:
            victim = next(policy.victims())
            policy.remove(victim)
            resident.discard(victim)
        policy.insert(key)
        resident.add(key)
    return hits / len(trace)


def touch_sequence(engine: Engine, digests: list[str]) -> None:
    """Warm the residency with a trace prefix: each access acquires (loading if cold) and releases."""
    for d in digests:
        state, _ = engine.residency.acquire(d)
        while state != READY:
            engine._wake.wait(0.01)
            engine._wake.clear()
            for digest, _, err in engine.residency.poll():
                if digest == d:
                    state = READY if err is None else "failed"
        if state == READY:
            engine.residency.release(d)


def section_zipf(base, size, report: Report) -> None:
    """d) Zipf over 10,000 adapters, max_cached=256: SLRU vs plain LRU (engine runs + policy simulation)."""
    n_items, cached = size["zipf_adapters"], size["zipf_cached"]
    tmp = tempfile.TemporaryDirectory()
    store = DirBlobs(tmp.name)
    layers = sorted(n for n in base.linear_modules() if n.endswith("q_proj"))
    spec = LoraSpec(rank=RANK, alpha=2 * RANK, target_modules=("q_proj",))
    g = torch.Generator().manual_seed(0)
    q = base.linear_modules()[layers[0]]
    d_in, d_out = q.in_features, q.out_features
    digests = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"d) writing {n_items} tiny adapters", total=n_items)
        for i in range(n_items):
            name = layers[i % len(layers)]  # one q_proj each: small random tensors, distinct digests
            A = torch.randn(RANK, d_in, generator=g) * 0.02
            B = torch.randn(d_out, RANK, generator=g) * 0.02
            digests.append(store.put(LoraAdapter(spec=spec, weights={name: (A, B)})))
            progress.advance(task)
    blob_kb = len(store(digests[0])) / 1024
    vocab = base.config.vocab_size
    full_trace = zipf_trace(n_items, size["zipf_warmup"] + size["zipf_requests"], 1.0, seed=11)
    warmup, trace = full_trace[: size["zipf_warmup"]], full_trace[size["zipf_warmup"] :]
    prompts = prompts_for(len(trace), 4, 31, vocab)
    rows = []
    for policy in ("slru", "lru"):
        engine = Engine(base, store, EngineConfig(max_batch=BATCH, max_active=BATCH, max_cached=cached,
                                                  max_rank=RANK, cache_policy=policy))
        with console.status(f"d) warming the {policy} cache with {len(warmup)} trace requests"):
            touch_sequence(engine, [digests[i] for i in warmup])
        before = engine.metrics_snapshot()["counters"]
        engine.start()
        handles, t0 = [], time.perf_counter()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"d) Zipf trace, {policy}", total=len(trace))
            for i, item in enumerate(trace):
                while sum(not h.done() for h in handles[-2 * BATCH :]) >= 2 * BATCH:
                    time.sleep(0.001)
                handles.append(engine.submit(prompts[i], digests[item], SamplingParams(max_tokens=2, ignore_eos=True)))
                progress.update(task, completed=sum(h.done() for h in handles))
            results = [h.result() for h in handles]
        wall = time.perf_counter() - t0
        after = engine.metrics_snapshot()["counters"]
        c = {k: after[k] - before[k] for k in after}
        hit_rate = (c["hits_ram"] + c["hits_slot"]) / (c["hits_ram"] + c["hits_slot"] + c["misses"])
        rows.append([f"engine, {policy}", len(trace), fmt(100 * hit_rate, 1), c["misses"], c["evictions_ram"],
                     fmt(len(trace) / wall, 2), fmt(sum(r.completion_tokens for r in results) / wall),
                     sum(not r.ok for r in results)])
        engine.close()
    sim_trace = zipf_trace(n_items, size["zipf_sim_requests"], 1.0, seed=12)
    for cls in (SLRUPolicy, LRUPolicy):
        rows.append([f"policy simulation, {cls.name}", len(sim_trace), fmt(100 * simulate(cls, cached, sim_trace), 1),
                     "—", "—", "—", "—", "—"])
    # regulars + a scan of one-off users: where frequency protection matters
    rng = random.Random(3)
    mixed, scan_id = [], n_items
    for key in sim_trace[: len(sim_trace) // 2]:
        mixed.append(key)
        if rng.random() < 0.5:
            mixed.append(scan_id)
            scan_id += 1
    for cls in (SLRUPolicy, LRUPolicy):
        rows.append([f"simulation with one-off scan traffic, {cls.name}", len(mixed),
                     fmt(100 * simulate(cls, cached, mixed), 1), "—", "—", "—", "—", "—"])
    report.add(
        f"d) Zipf (s=1.0) over {n_items:,} adapters, max_cached={cached}",
        ["run", "requests", "hit rate %", "misses", "RAM evictions", "requests/s", "tok/s", "errors"],
        rows,
        f"Tiny rank-{RANK} adapters on one q_proj each ({blob_kb:.0f} KB blobs in a directory store). Engine runs: "
        "4 prompt tokens, 2 new tokens, up to 64 requests outstanding, batch 32, 32 slots; hit = adapter already in "
        "RAM or a slot, counted after a warm-up of "
        f"{size['zipf_warmup']:,} requests of the same trace (loads only, no generation). Simulations: the same "
        "policy classes without the engine; the scan "
        "variant interleaves the Zipf trace with never-repeated adapters (1 per 2 requests).",
    )
    tmp.cleanup()


def section_ceiling(base, size, ceiling: dict, report: Report) -> None:
    """e) matmul GFLOP/s of this machine vs what the engine reaches."""
    peak_square = matmul_gflops(1024, 1024, 1024, 1.5)
    peak_decode = matmul_gflops(BATCH, 576, 1536, 1.0)
    linears = [m for n, m in base.model.named_modules() if isinstance(m, torch.nn.Linear)]
    layer_params = sum(m.weight.numel() for m in linears if m is not base.model.lm_head)
    head_params = base.model.lm_head.weight.numel()
    per_token_decode = 2 * (layer_params + head_params)
    decode_gflops = ceiling["decode"] * per_token_decode / 1e9
    # prefill: a few long prompts, one token out (lm_head only at the last position)
    engine = Engine(base, DictBlobs(), EngineConfig(max_batch=BATCH, max_rank=RANK))
    prompts = prompts_for(8, size["prefill_prompt"], 8, base.config.vocab_size)
    engine.generate(prompts[:1], None, SamplingParams(max_tokens=1))
    run = run_engine(engine, prompts, None, 1)
    prompt_tokens = sum(len(p) for p in prompts)
    prefill_flops = 2 * layer_params * prompt_tokens + 2 * head_params * len(prompts)
    prefill_gflops = prefill_flops / run["prefill_s"] / 1e9
    engine.close()
    peak = max(peak_square, peak_decode)
    big = torch.empty(64 * 2**20 // 4)  # 64 MB, well beyond the caches
    dst = torch.empty_like(big)
    dst.copy_(big)
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0:
        dst.copy_(big)
        reps += 1
    bandwidth = 2 * big.numel() * 4 * reps / (time.perf_counter() - t0) / 1e9  # read + write
    weight_bytes = 4 * (layer_params + head_params)
    stream_bound = bandwidth * 1e9 / weight_bytes * BATCH * per_token_decode / 1e9  # GFLOP/s if weights stream once
    report.add(
        "e) The ceiling: matmul throughput of this machine vs the engine",
        ["measure", "GFLOP/s", "fraction of peak matmul"],
        [
            ["matmul 1024x1024x1024 (peak)", fmt(peak_square), fmt(peak_square / peak, 2)],
            [f"matmul {BATCH}x576x1536 (decode-shaped)", fmt(peak_decode), fmt(peak_decode / peak, 2)],
            [f"decode bound: stream {weight_bytes / 1e6:.0f} MB of weights per step at {bandwidth:.1f} GB/s, "
             f"batch {BATCH}",
             fmt(stream_bound), fmt(stream_bound / peak, 2)],
            [f"engine decode, batch {BATCH}, no adapters", fmt(decode_gflops), fmt(decode_gflops / peak, 2)],
            [f"engine prefill, {len(prompts)}x{size['prefill_prompt']} tokens", fmt(prefill_gflops),
             fmt(prefill_gflops / peak, 2)],
        ],
        f"Model FLOPs: 2 x {layer_params / 1e6:.1f} M layer weights per token, plus 2 x {head_params / 1e6:.1f} M for "
        "the LM head per decoded token (prefill computes logits for the last position only). Attention score FLOPs "
        "are left out (short contexts).",
    )


def rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096
    except (OSError, IndexError, ValueError):
        return 0


def section_memory(base, report: Report) -> None:
    """128 active rank-8 adapters in an engine: what the slot table and the RAM tier really hold."""
    rows = []
    for targets in ("attention", "all"):
        blobs = DictBlobs()
        digests = []
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"memory: 128 adapters ({targets})", total=128)
            for i in range(128):
                digests.append(blobs.put(make_adapters(base, 1, targets, seed0=9000 + i)[0]))
                progress.advance(task)
        one = len(blobs(digests[0]))
        gc.collect()
        rss0 = rss_bytes()
        engine = Engine(base, blobs, EngineConfig(max_batch=BATCH, max_active=128, max_cached=128, max_rank=RANK))
        wait_ready(engine, digests)
        for d in digests:  # make all 128 active: each in a compute slot
            engine.residency.acquire(d)
            assert engine.residency.activate(d) is not None
        gc.collect()
        snap = engine.residency_snapshot()
        rss1 = rss_bytes()
        per_adapter = snap["ram"][0]["bytes"]
        total = snap["ram_bytes"] + snap["slot_table_bytes"]
        rows.append([f"rank {RANK}, {targets}", fmt(per_adapter / 1e6, 2), fmt(one / 1e6, 2),
                     fmt(snap["slot_table_bytes"] / 128 / 1e6, 2), fmt(snap["slot_table_bytes"] / 1e9, 2),
                     fmt(snap["ram_bytes"] / 1e9, 2), fmt(total / 1e9, 2), fmt((rss1 - rss0) / 1e9, 2)])
        engine.close()
        del engine, blobs
        gc.collect()
    head_dim = base.config.hidden_size // base.config.num_attention_heads
    kv_col = 2 * base.config.num_hidden_layers * base.config.num_key_value_heads * head_dim * 4
    report.add(
        "Memory: bytes per resident adapter, and 128 active adapters on SmolLM2",
        ["adapter", "RAM entry MB", "blob MB", "slot MB", "128-slot table GB", "RAM copies GB",
         "128 active, total GB (target ≤ 2)", "process RSS growth GB"],
        rows,
        f"An engine with max_active = max_cached = 128 and all 128 adapters in compute slots. The SlotTable holds "
        f"every wrapped projection (7 per layer) at max_rank={RANK}, so a slot costs the same for either target "
        "set; an adapter in a slot is not also kept in RAM (exclusive tiers). RSS growth includes allocator "
        f"slack. KV cache: {kv_col / 1e3:.0f} KB per token per sequence (batch 32 x 256 tokens = "
        f"{32 * 256 * kv_col / 1e9:.2f} GB). The base itself is 0.54 GB (float32).",
    )


# -- main ----------------------------------------------------------------------------------------------------------


def machine() -> str:
    try:
        return subprocess.run(["uname", "-a"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return platform.platform()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--targets", default="attention", help="adapter target modules (default: LoraSpec's)")
    parser.add_argument("--threads", default="auto", help="torch intra-op threads: auto (faster matmul), 1, 2")
    parser.add_argument("--out", default=None, help="markdown output (default: docs/results/serving.md, full only)")
    parser.add_argument("--no-peft", action="store_true", help="skip the peft comparison")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    size = SIZES[mode]
    started = time.perf_counter()
    threads = pick_threads(args.threads)
    console.print(f"[bold]serving benchmark[/bold] ({mode}); threads {threads['threads']} "
                  f"(decode-shaped matmul GFLOP/s by threads: "
                  f"{ {t: round(g, 1) for t, g in threads['measured'].items()} })")
    base = load_base()
    hf_plain = copy.deepcopy(base.model)  # unwrapped copies: transformers generate, and peft's own wrapping
    plain_peft = None if args.no_peft else copy.deepcopy(base.model)
    report = Report()
    ceiling: dict = {}
    timings = {}

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        fn(*a)
        timings[name] = time.perf_counter() - t0
        console.print(f"[dim]{name}: {timings[name]:.0f} s[/dim]")

    timed("a+b throughput", section_throughput, base, plain_peft, hf_plain, size, args.targets, report, ceiling)
    del plain_peft, hf_plain
    gc.collect()
    timed("c cold loads", section_cold, base, size, args.targets, report)
    timed("d zipf", section_zipf, base, size, report)
    timed("e ceiling", section_ceiling, base, size, ceiling, report)
    timed("memory", section_memory, base, report)
    elapsed = time.perf_counter() - started
    console.print(f"done in {elapsed / 60:.1f} min")
    out = args.out or (None if args.quick else str(ROOT / "docs" / "results" / "serving.md"))
    if out:
        command = "python benchmarks/serving_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
        load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
        header = [
            "# Serving benchmark results",
            "",
            f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: `{machine()}`, {torch.get_num_threads()} torch threads of {_cores()} cores "
            f"(load average at the end: {' '.join(load)}; other jobs shared the machine)",
            f"- base: {base.name} (float32, CPU), torch {torch.__version__}",
            f"- command: `{command.strip()}` ({mode} mode, {elapsed / 60:.1f} min)",
            f"- threads: picked by decode-shaped matmul GFLOP/s "
            f"{ {t: round(g, 1) for t, g in threads['measured'].items()} }",
            "",
        ]
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(header) + "\n" + report.markdown())
        console.print(f"wrote {out}")


def _peft_version() -> str:
    import peft  # noqa: PLC0415

    return peft.__version__


def _cores() -> int:
    import os  # noqa: PLC0415

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
