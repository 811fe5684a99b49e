"""GPU serving at S-LoRA scale: the Triton multi-adapter kernels and the engine on one CUDA device, in one call.

Sections, each time-boxed (the whole run stays under ~8 minutes on an H200), measured side by side:

1. check     the kernels against the operator's plain-loop reference on the device (fp32 <= 1e-5, bf16 <= 1e-2
             relative; mixed ranks, -1 rows, empty segments, stacks), and a whole-model forward kernels vs torch
2. ceilings  the device's measured ceilings: a large device-to-device copy (GB/s), a bf16 matmul (TFLOP/s)
3. kernels   decode (256 rows) and prefill (8192 tokens) at Llama-3-8B projection shapes: Triton vs the torch
             gather/segmented path; achieved GB/s and TFLOP/s against the ceilings
4. engine    continuous-batching throughput (decode and prefill tok/s from the engine's own timers), 1024
             requests, batch 256, with 1 / 10 / 100 / 1000 distinct adapters in flight (rank 8, and mixed ranks
             8/16/32/64), base-only, and the torch path at 100 adapters; random bf16 bases at the shapes of
             SmolLM2-135M and of Llama-3-8B, built on the device
5. peft      peft's mixed-adapter batches (``generate(adapter_names=...)``) on the same GPU, 100 adapters

Targets: LoRA tax < 10% at 100 adapters; throughput flat from 100 to 1000 adapters; >= 10x peft at 100 adapters.

    python benchmarks/gpu_lora.py              # CUDA: everything, writes docs/results/gpu_lora.md
    python benchmarks/gpu_lora.py --smoke      # CPU: tiny shapes, torch path, ~1 min (docs/results/gpu_lora_smoke.md)
    python benchmarks/gpu_lora.py --smoke --interpret   # ... plus the kernels in Triton's CPU interpreter
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

if "--interpret" in sys.argv:  # must precede torch: torch imports triton, which fixes interpret mode at import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

ADAPTER_TARGETS = "attention"  # q/k/v/o, as S-LoRA and Punica serve Llama; keeps 1000 8B adapters in host RAM
MIXED_RANKS = (8, 16, 32, 64)
# 1000 mixed-rank (mean 30) Llama-3-8B adapters are ~51 GB of blobs plus ~51 GB parsed: more than the host RAM
# and the time box allow; the mixed 8B runs stop at 100 (rank 8 goes to 1000 at both shapes).
MIXED_K_CAP = {"llama-3-8b": 100}


@dataclass(frozen=True)
class Sizes:
    models: tuple[str, ...]
    ks: tuple[int, ...]
    requests: int
    batch: int
    prompt: int
    new: int
    peft_k: int
    peft_requests: int
    kernel_rows: int
    kernel_tokens: int
    kernel_shapes: tuple[tuple[int, int], ...]
    boxes: dict  # seconds per section


FULL = Sizes(models=("smollm2-135m", "llama-3-8b"), ks=(1, 10, 100, 1000), requests=1024, batch=256, prompt=64,
             new=32, peft_k=100, peft_requests=256, kernel_rows=256, kernel_tokens=8192,
             kernel_shapes=((4096, 4096), (4096, 14336), (14336, 4096)),
             boxes={"check": 40, "ceilings": 20, "kernels": 50, "engine:smollm2-135m": 80,
                    "engine:llama-3-8b": 150, "peft": 60})
SMOKE = Sizes(models=("smoke-tiny",), ks=(1, 4), requests=8, batch=4, prompt=6, new=3, peft_k=4, peft_requests=4,
              kernel_rows=8, kernel_tokens=32, kernel_shapes=((64, 96),),
              boxes={"check": 120, "ceilings": 10, "kernels": 120, "engine:smoke-tiny": 120, "peft": 60})


def llama_config(name: str):
    """transformers LlamaConfig at the shapes of the named model (weights are random; only shapes matter)."""
    from transformers import LlamaConfig  # noqa: PLC0415

    shapes = {
        "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
        "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
        "smoke-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, tie_word_embeddings=True),
    }[name]
    return LlamaConfig(**shapes, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)


def random_base(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A frozen random-init Llama at ``name``'s shapes, built directly on ``device`` (no host copy)."""
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    from lorafleet.base.loader import BaseModel  # noqa: PLC0415
    from lorafleet.base.sources import BaseSource  # noqa: PLC0415
    from lorafleet.base.tiny import tiny_tokenizer  # noqa: PLC0415

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(llama_config(name), dtype=dtype)
    model.eval().requires_grad_(False)
    tokenizer = tiny_tokenizer()  # prompts are token ids; the tokenizer only names eos/pad
    return BaseModel(name=f"random-{name}", source=BaseSource(name=f"random-{name}", kind="tiny"), model=model,
                     tokenizer=tokenizer, fingerprint=f"random-{name}-{seed}", load_seconds=time.perf_counter() - t0,
                     from_cache=False)


def random_adapters(base, ranks: list[int], dtype: torch.dtype, seed0: int = 0):
    """``len(ranks)`` distinct adapters (digests differ) drawn on the device, returned as canonical bytes."""
    from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes  # noqa: PLC0415

    device = base.device
    linears = [(n, m) for n, m in sorted(base.linear_modules().items()) if n.rsplit(".", 1)[-1] in
               LoraSpec(target_modules=ADAPTER_TARGETS).target_modules]

    def one(i: int) -> bytes:
        r = ranks[i]
        g = torch.Generator(device).manual_seed(seed0 + i)
        sizes = [(r, m.in_features) for _, m in linears] + [(m.out_features, r) for _, m in linears]
        flat = torch.randn(sum(a * b for a, b in sizes), generator=g, device=device, dtype=dtype).cpu()
        parts = [p.view(shape).clone() for p, shape in zip(flat.split([a * b for a, b in sizes]), sizes, strict=True)]
        k = len(linears)
        weights = {n: (parts[j] / math.sqrt(m.in_features), parts[k + j] * 0.02) for j, (n, m) in enumerate(linears)}
        return to_bytes(LoraAdapter(spec=LoraSpec(rank=r, alpha=2 * r, target_modules=ADAPTER_TARGETS),
                                    weights=weights, base_name=base.name))

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, range(len(ranks))))


# -- timing ------------------------------------------------------------------------------------------------------


def bench(fn: Callable[[], object], device: torch.device, min_s: float = 0.2) -> float:
    """Median seconds per call of ``fn`` (CUDA: triton's do_bench, events and L2 flush; CPU: wall clock)."""
    if device.type == "cuda":
        from triton.testing import do_bench  # noqa: PLC0415

        return do_bench(fn, warmup=25, rep=max(25, int(min_s * 1000)), return_mode="median") / 1e3
    fn()
    times, t_end = [], time.perf_counter() + min_s
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


DEADLINE = [float("inf")]  # monotonic time by which the whole run must be done (--budget)


class Box:
    """A section's time box: ``left()`` seconds remain; configs not started in time are reported as skipped.
    Never runs past the whole run's deadline."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name, self.t0 = name, time.monotonic()
        self.seconds = min(seconds, DEADLINE[0] - self.t0)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def over(self) -> bool:
        return self.left() <= 0


def kernel_env(mode: str):
    """Context: force the operator's kernel choice (``triton`` | ``torch``) for the block."""
    from contextlib import contextmanager  # noqa: PLC0415

    from lorafleet.adapters import triton_lora  # noqa: PLC0415

    @contextmanager
    def ctx():
        old = os.environ.get(triton_lora.ENV)
        os.environ[triton_lora.ENV] = mode
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(triton_lora.ENV, None)
            else:
                os.environ[triton_lora.ENV] = old

    return ctx()


def fmt(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:,.{digits}f}"


# -- 1. check ------------------------------------------------------------------------------------------------------


def random_table(S: int, ranks: list[int], d_in: int, d_out: int, device, dtype, seed: int):
    """Slot tensors ``A: (S, r_max, in)``, ``B: (S, out, r_max)`` drawn on ``device``; slot s has rank
    ``ranks[s % len(ranks)]`` (zero beyond it), plus ``scaling: (S,)`` and ``ranks: (S,)``."""
    g = torch.Generator(device).manual_seed(seed)
    rank_t = torch.tensor([ranks[s % len(ranks)] for s in range(S)], dtype=torch.int32, device=device)
    r_max = max(ranks)
    live = torch.arange(r_max, device=device)[None, :] < rank_t[:, None]  # (S, r_max)
    A = torch.randn(S, r_max, d_in, generator=g, device=device, dtype=dtype) / math.sqrt(d_in)
    B = torch.randn(S, d_out, r_max, generator=g, device=device, dtype=dtype) / math.sqrt(8)
    A *= live[:, :, None]
    B *= live[:, None, :]
    scaling = torch.rand(S, generator=g, device=device, dtype=dtype) + 0.5
    return A, B, scaling, rank_t


def section_check(device, sizes: Sizes, box: Box, interpret: bool) -> tuple[list[list], bool]:
    from lorafleet.adapters import triton_lora as tk  # noqa: PLC0415
    from lorafleet.adapters.operator import lora_delta_reference  # noqa: PLC0415

    rows, ok = [], True
    if not (device.type == "cuda" or interpret):
        return [["kernels", "—", "—", "—", "not run (no CUDA; --interpret runs them in Triton's CPU interpreter)"]], True
    small = device.type != "cuda"
    cases = [  # (name, Bsz, T, levels, S, ranks, d_in, d_out)
        ("decode, mixed ranks, -1 rows", 9, 1, 1, 6, [8, 16, 3, 64], 72, 40),
        ("decode, stacks of 3", 7, 1, 3, 5, [8, 16], 48, 56),
        ("prefill, empty segments", 6, 5, 1, 12, [4, 8, 32], 40, 72),
        ("prefill, stacks of 2", 5, 9, 2, 7, [16, 64], 64, 48),
    ]
    if not small:
        cases += [("decode, 8B gate shape", 256, 1, 1, 256, list(MIXED_RANKS), 4096, 14336),
                  ("prefill, 8B down shape", 16, 128, 1, 16, [16], 14336, 4096)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for name, bsz, T, levels, S, ranks, d_in, d_out in cases:
            if box.over():
                rows.append([name, str(dtype).replace("torch.", ""), "—", "—", "skipped (time box)"])
                continue
            A, B, scaling, rank_t = random_table(S, ranks, d_in, d_out, device, dtype, seed=len(rows))
            g = torch.Generator().manual_seed(100 + len(rows))
            used = torch.arange(0, S, 2)  # odd slots stay unused: empty segments
            pick = torch.randint(0, used.numel() + 1, (bsz, levels), generator=g)
            slots = torch.where(pick == used.numel(), -1, used[pick.clamp(max=used.numel() - 1)]).to(device)
            x = torch.randn(bsz, T, d_in, generator=g).to(device=device, dtype=dtype)
            ref = lora_delta_reference(x.float(), A.float(), B.float(), scaling.float(), slots)
            got = tk.lora_delta_triton(x, A, B, scaling, slots, rank_t).float()
            err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            good = err <= tol
            ok &= good
            rows.append([name, str(dtype).replace("torch.", ""), f"{err:.1e}", f"{tol:.0e}", "ok" if good else "FAIL"])
    return rows, ok


def check_model(base, device, box: Box) -> list[list]:
    """One forward of the whole model with mixed slots: logits via the kernels vs via the torch path."""
    from lorafleet.adapters import LoraHost, SlotTable, from_bytes  # noqa: PLC0415

    if box.over():
        return [[base.name, "whole-model logits", "—", "—", "skipped (time box)"]]
    host = LoraHost.attach(base.model)
    table = SlotTable(host, 4, max(MIXED_RANKS), dtype=next(base.model.parameters()).dtype, device=device)
    for s, data in enumerate(random_adapters(base, list(MIXED_RANKS), torch.float32, seed0=77)):
        table.load(s, from_bytes(data))
    ids = torch.randint(3, 500, (6, 16), device=device)
    slots = torch.tensor([[0, 1], [1, -1], [-1, -1], [2, 3], [3, 3], [-1, 0]], device=device)
    out = {}
    for mode in ("torch", "triton"):
        with kernel_env(mode), torch.inference_mode(), host.route(table, slots):
            out[mode] = base.model(ids).logits.float()
    err = ((out["triton"] - out["torch"]).norm() / out["torch"].norm()).item()
    return [[base.name, "whole-model logits, fp32 (rel. L2)", f"{err:.1e}", "1e-04", "ok" if err <= 1e-4 else "FAIL"]]


# -- 2. ceilings --------------------------------------------------------------------------------------------------


def copy_gbs(n: int, device) -> float:
    """Device-to-device copy of ``n`` bf16 elements: GB/s counting the read and the write."""
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * n * 2 / bench(lambda: dst.copy_(src), device) / 1e9


def matmul_tflops(n: int, device) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / bench(lambda: a @ b, device) / 1e12


def section_ceilings(device, sizes: Sizes) -> dict:
    n_copy = (4 << 30) // 2 if device.type == "cuda" else (64 << 20) // 2  # 4 GiB of bf16 on the GPU
    n = 8192 if device.type == "cuda" else 512
    return {"copy_gbs": copy_gbs(n_copy, device), "matmul_tflops": matmul_tflops(n, device), "copy_bytes": n_copy * 2,
            "matmul_n": n}


# -- 3. kernels ---------------------------------------------------------------------------------------------------


def section_kernels(device, sizes: Sizes, ceil: dict, box: Box, interpret: bool) -> list[list]:
    from lorafleet.adapters import triton_lora as tk  # noqa: PLC0415
    from lorafleet.adapters.operator import lora_delta  # noqa: PLC0415

    use_triton = device.type == "cuda" or interpret
    rows = []
    dtype = torch.bfloat16
    for d_in, d_out in sizes.kernel_shapes:
        for label, ranks in (("rank 16", [16]), ("mixed 8-64", list(MIXED_RANKS))):
            S = max(sizes.kernel_rows, 16)  # slots: enough for every row (decode) and segment (prefill)
            A, B, scaling, rank_t = random_table(S, ranks, d_in, d_out, device, dtype, seed=d_in + d_out)
            for phase, k in (("decode", 1), ("decode", 16), ("decode", sizes.kernel_rows),
                             ("prefill", 1), ("prefill", 16)):
                if box.over():
                    rows.append([f"{d_in}→{d_out}", label, phase, k] + ["—"] * 6 + ["skipped (time box)"])
                    continue
                bsz, T = (sizes.kernel_rows, 1) if phase == "decode" else (16, sizes.kernel_tokens // 16)
                slots = (torch.arange(bsz, device=device) % k)[:, None]  # (Bsz, 1), k distinct adapters
                x = torch.randn(bsz, T, d_in, device=device, dtype=dtype)
                y = torch.zeros(bsz, T, d_out, device=device, dtype=dtype)
                used = rank_t[:k].long()
                lora_bytes = int(used.sum()) * (d_in + d_out) * 2  # only the adapters' own ranks are read
                io_bytes = bsz * T * (d_in + 2 * d_out) * 2  # x read, y read + written
                flops = 2 * T * int(rank_t[slots[:, 0]].long().sum()) * (d_in + d_out)  # shrink + expand
                args = (x, A, B, scaling, slots)
                with kernel_env("torch"):
                    t_torch = bench(lambda args=args: lora_delta(*args), device)
                t_tri = (bench(lambda y=y, args=args, r=rank_t: tk.lora_add_(y, *args, r), device) if use_triton
                         else float("nan"))
                gbs = (lora_bytes + io_bytes) / t_tri / 1e9
                tflops = flops / t_tri / 1e12
                rows.append([f"{d_in}→{d_out}", label, phase, k, f"{bsz}×{T}", fmt(t_torch * 1e6), fmt(t_tri * 1e6),
                             fmt(t_torch / t_tri, 2), f"{fmt(gbs, 0)} ({fmt(100 * gbs / ceil['copy_gbs'])}%)",
                             f"{fmt(tflops, 2)} ({fmt(100 * tflops / ceil['matmul_tflops'], 2)}%)", ""])
    return rows


# -- 4. engine ---------------------------------------------------------------------------------------------------


def engine_runs(name: str, device, sizes: Sizes, box: Box, dtype) -> tuple[list[list], dict]:
    """Throughput of the engine over one random base; returns table rows and {config: decode tok/s}."""
    from serving_bench import run_engine, wait_ready  # noqa: PLC0415

    from lorafleet.serving.engine import Engine, EngineConfig  # noqa: PLC0415
    from lorafleet.serving.sources import DictBlobs  # noqa: PLC0415

    rows, tok = [], {}
    base = random_base(name, device, dtype)
    vocab = base.model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, min(vocab, 30000), (sizes.requests, sizes.prompt), generator=g).tolist()
    k_max = max(sizes.ks)
    for label, ranks in (("rank 8", [8]), ("mixed 8/16/32/64", list(MIXED_RANKS))):
        if box.left() < 10:
            rows.append([name, label, "—"] + ["—"] * 6 + ["skipped (time box)"])
            continue
        t0 = time.perf_counter()
        k_top = min(k_max, MIXED_K_CAP.get(name, k_max)) if len(ranks) > 1 else k_max
        blobs = DictBlobs()
        data = random_adapters(base, [ranks[i % len(ranks)] for i in range(k_top)], dtype, seed0=1000)
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(blobs.put, data))  # sha256 of each blob, in parallel
        del data
        cfg = EngineConfig(max_batch=sizes.batch, max_active=sizes.batch, max_cached=k_top + sizes.batch,
                           max_rank=max(ranks), max_prefill_tokens=sizes.batch * sizes.prompt,
                           join_batch=sizes.batch, cache_policy="lru", load_workers=8,
                           parse_workers=min(8, os.cpu_count() or 1), max_inflight_loads=32)
        with Engine(base, blobs, cfg) as engine:
            wait_ready(engine, digests)
            setup = time.perf_counter() - t0
            plan = ([("base only", 0, "triton")] if label == "rank 8" else []) + \
                [(f"{k} adapters", k, "triton") for k in sizes.ks] + \
                ([(f"{min(100, k_top)} adapters, torch path", min(100, k_top), "torch")] if label == "rank 8" else [])
            warm = [digests[i % k_top] for i in range(sizes.batch)]
            run_engine(engine, prompts[: sizes.batch], warm, 2)  # warm-up: kernels compiled, slots filled
            for what, k, mode in plan:
                if k > k_top:
                    rows.append([name, label, what] + ["—"] * 6 + [f"not run: {k_top} adapters at most here (RAM)"])
                    continue
                if box.over():
                    rows.append([name, label, what] + ["—"] * 6 + ["skipped (time box)"])
                    continue
                adapters = [None] * sizes.requests if k == 0 else [digests[i % k] for i in range(sizes.requests)]
                with kernel_env(mode):
                    r = run_engine(engine, prompts, adapters, sizes.new)
                prefill_tok_s = sizes.requests * sizes.prompt / r["prefill_s"] if r["prefill_s"] else float("nan")
                tok[(label, what)] = r["tok_s"]
                rows.append([name, label, what, sizes.requests, fmt(r["tok_s"], 0), fmt(r["decode_tok_s"], 0),
                             fmt(prefill_tok_s, 0), r["errors"], f"{setup:.0f}", ""])
        del blobs, digests, engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, tok


def peft_runs(name: str, device, sizes: Sizes, box: Box, dtype) -> tuple[list[list], float | None]:
    from serving_bench import hf_generate, peft_with_adapters  # noqa: PLC0415

    from lorafleet.adapters import from_bytes  # noqa: PLC0415

    if box.left() < 15:
        return [[name, f"peft, {sizes.peft_k} adapters", "—", "—", "skipped (time box)"]], None
    base = random_base(name, device, dtype)
    adapters = [from_bytes(b) for b in random_adapters(base, [8] * sizes.peft_k, dtype, seed0=1000)]
    t0 = time.perf_counter()
    model = peft_with_adapters(base.model, adapters)
    build = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    vocab = base.model.config.vocab_size
    prompts = torch.randint(3, min(vocab, 30000), (sizes.peft_requests, sizes.prompt), generator=g).tolist()
    names = [f"a{i % sizes.peft_k}" for i in range(sizes.peft_requests)]
    r = hf_generate(model, prompts, sizes.new, adapter_names=names, batch=sizes.batch)
    rows = [[name, f"peft generate, {sizes.peft_k} adapters mixed, batch {sizes.batch}", fmt(r["tok_s"], 0),
             f"{build:.0f}", ""]]
    del model, base, adapters
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, r["tok_s"]


# -- report ---------------------------------------------------------------------------------------------------------


def targets(tok: dict, peft_tok: dict, engine_tok_s: dict, peft_k: int) -> list[list]:
    rows = []
    for name in tok:
        t = tok[name]
        base = t.get(("rank 8", "base only"))
        for label in ("rank 8", "mixed 8/16/32/64"):
            k100, k1000 = t.get((label, "100 adapters")), t.get((label, "1000 adapters"))
            if base and k100:
                tax = 100 * (1 - k100 / base)
                rows.append([name, f"LoRA tax at 100 adapters ({label})", "< 10%", f"{tax:.1f}%",
                             "met" if tax < 10 else "missed"])
            if k100 and k1000:
                ratio = k1000 / k100
                rows.append([name, f"1000 vs 100 adapters ({label}, decode tok/s)", "flat (>= 0.9)", f"{ratio:.2f}",
                             "met" if ratio >= 0.9 else "missed"])
        if peft_tok.get(name) and engine_tok_s.get(name):
            x = engine_tok_s[name] / peft_tok[name]
            rows.append([name, f"engine vs peft mixed batches at {peft_k} adapters (tok/s)", ">= 10x", f"{x:.1f}x",
                         "met" if x >= 10 else "missed"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", "--quick", action="store_true", help="CPU, tiny shapes (a crash test, not numbers)")
    p.add_argument("--interpret", action="store_true", help="with --smoke: the kernels in Triton's interpreter")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (sections are cut to fit)")
    args = p.parse_args(argv)
    DEADLINE[0] = time.monotonic() + args.budget

    from _common import console, markdown_table, show, write_result  # noqa: PLC0415

    if not args.smoke and not torch.cuda.is_available():
        console.print("gpu_lora: no CUDA device here; nothing measured (use --smoke for the CPU crash test)")
        return 0
    device = torch.device("cuda" if not args.smoke else "cpu")
    if device.type == "cuda":  # fp32 references must be fp32 (no TF32), as the kernels' fp32 path is
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    sizes = SMOKE if args.smoke else FULL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_start = time.monotonic()
    sections: list[tuple[str, str]] = []
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    name_out = "gpu_lora_smoke" if args.smoke else "gpu_lora"
    title_out = "GPU serving at S-LoRA scale (Triton kernels)"

    def add(title: str, headers: list[str], rows: list[list], note: str = "") -> None:
        show(title, headers, rows)
        sections.append((title, markdown_table(headers, rows) + (f"\n\n{note}" if note else "")))
        console.print(f"[{time.monotonic() - t_start:.0f}s] {title} done")
        # written after every section: a run cut short still leaves what it measured
        write_result(name_out, title_out, sections, "INCOMPLETE: the run stopped or is still running after this.")

    def guarded(what: str, width: int, fn: Callable, *fargs):
        """``fn(*fargs)``; on an exception, one row naming it (the traceback goes to stderr) and the run goes on."""
        try:
            return fn(*fargs)
        except Exception as exc:  # noqa: BLE001 - a failed section must not lose the others' numbers
            traceback.print_exc()
            return [[what] + ["—"] * (width - 2) + [f"ERROR {type(exc).__name__}: {str(exc)[:300]}"]]

    def check_all():
        box = Box("check", sizes.boxes["check"])
        rows, ok = section_check(device, sizes, box, args.interpret)
        if device.type == "cuda" or args.interpret:
            check_base = random_base(sizes.models[0], device, torch.float32)  # fp32: both paths exact, comparable
            rows += check_model(check_base, device, box)
        return rows

    rows = guarded("kernel check", 5, check_all)
    ok = not any(r[-1] == "FAIL" or str(r[-1]).startswith("ERROR") for r in rows)
    add("1. Kernels vs the plain-loop reference", ["case", "dtype", "max err (rel. to max)", "tolerance", "result"],
        rows)

    try:
        ceil = section_ceilings(device, sizes)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        ceil = {"copy_gbs": float("nan"), "matmul_tflops": float("nan"), "copy_bytes": 0, "matmul_n": 0}
    add("2. Device ceilings", ["measure", "value"],
        [[f"device-to-device copy, {ceil['copy_bytes'] >> 20} MiB (read + write)", f"{ceil['copy_gbs']:,.0f} GB/s"],
         [f"bf16 matmul {ceil['matmul_n']}³", f"{ceil['matmul_tflops']:,.1f} TFLOP/s"]])

    rows = guarded("kernels", 11, section_kernels, device, sizes, ceil, Box("kernels", sizes.boxes["kernels"]),
                   args.interpret)
    add("3. Kernels alone (bf16): Triton vs the torch path",
        ["shape in→out", "ranks", "phase", "adapters", "rows×T", "torch µs", "triton µs", "speed-up",
         "achieved GB/s (% of copy)", "TFLOP/s (% of matmul)", "note"], rows,
        "Bytes counted: each distinct adapter's A and B at its own rank, x read, y read and written. Decode is "
        "memory-bound (rank × (in + out) weights per adapter per token row); prefill reuses each adapter's weights "
        "over its segment's tokens.")

    tok, engine_rows, peft_rows, peft_tok, engine_k100 = {}, [], [], {}, {}
    for name in sizes.models:
        box = Box(f"engine:{name}", sizes.boxes[f"engine:{name}"])
        out = guarded(name, 10, engine_runs, name, device, sizes, box, dtype)
        rows, tok[name] = out if isinstance(out, tuple) else (out, {})
        engine_rows += rows
        engine_k100[name] = tok[name].get(("rank 8", f"{sizes.peft_k} adapters"))
    add("4. Engine throughput (continuous batching, batch "
        f"{sizes.batch}, {sizes.requests} requests × {sizes.prompt} prompt + {sizes.new} new tokens)",
        ["base shapes", "adapters", "in flight", "requests", "tok/s (wall)", "decode tok/s", "prefill tok/s",
         "errors", "setup s", "note"], engine_rows,
        f"Adapters target {ADAPTER_TARGETS} (q/k/v/o). Decode and prefill tok/s come from the engine's own step "
        "timers; 'setup' is drawing, serializing and loading the adapters into host RAM (not in the throughput).")

    box = Box("peft", sizes.boxes["peft"])
    for name in sizes.models:
        out = guarded(name, 5, peft_runs, name, device, sizes, box, dtype)
        rows, peft_tok[name] = out if isinstance(out, tuple) else (out, None)
        peft_rows += rows
    add("5. peft mixed-adapter batches on the same device", ["base shapes", "run", "tok/s", "build s", "note"],
        peft_rows)

    add("Targets", ["base shapes", "target", "goal", "measured", "verdict"], targets(tok, peft_tok, engine_k100, sizes.peft_k) or
        [["—", "—", "—", "—", "not enough runs finished"]])
    total = time.monotonic() - t_start
    notes = (f"Device: {dev_name}. Total {total:.0f} s. Kernel check: {'all ok' if ok else 'FAILURES (see 1)'}. "
             f"Bases are random-init LlamaForCausalLM at the named shapes ({str(dtype).replace('torch.', '')}), "
             "eager transformers forward (no CUDA graphs). ")
    if args.smoke:
        notes += ("SMOKE RUN on CPU with tiny shapes: a crash test of the script, not a measurement of anything "
                  "the targets are about.")
    write_result(name_out, title_out, sections, notes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
