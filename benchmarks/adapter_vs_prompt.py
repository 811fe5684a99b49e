"""Does a personal adapter earn its bytes? The adapter against the user put in the prompt.

    python benchmarks/adapter_vs_prompt.py            # 6 personas (format + memory) on SmolLM2-135M-Instruct
    python benchmarks/adapter_vs_prompt.py --quick    # 2 personas (1 format, 1 memory), 6 held-out prompts each
    python benchmarks/adapter_vs_prompt.py --tiny     # the tiny random model, a smoke run (writes nothing)

Each persona gets one adapter trained with the CLI defaults (``lorafleet train``: rank 8, alpha 16, all
projections, 30 steps, lr 1e-3, 4 rows per step, max_len 256), all personas packed in the same steps of one
``MultiTenantTrainer``. Then, on the same held-out prompts, held-out adherence (the persona's checker, greedy)
for the five conditions of :mod:`lorafleet.evaluation.baselines`: base, base + in-context profile (system prompt
from the persona's description + k of its training examples), base + retrieval (the k most similar training
examples, BM25), adapter, adapter + in-context. Finally the serving cost of each condition's prompts, measured
on the engine: the same requests (every persona's held-out prompts under that condition, each on its own
adapter for the adapter conditions) submitted together, a fixed number of new tokens, best of the repetitions:
time to first token and generated tokens per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_PERSONAS = "ahab,quiet,veggie,lisboeta,priya,rustacean"
QUICK_PERSONAS = "quiet,veggie"
LABELS = {"base": "base", "in_context": "base + in-context", "retrieval": "base + retrieval (BM25)",
          "adapter": "adapter", "adapter_in_context": "adapter + in-context"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 personas, 6 held-out prompts each (writes the file)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model, a few steps; writes nothing")
    parser.add_argument("--personas", default=None, help=f"comma list of shipped personas (default {DEFAULT_PERSONAS})")
    parser.add_argument("--k", type=int, default=4, help="examples in context (in-context and retrieval)")
    parser.add_argument("--eval-n", type=int, default=None, help="held-out prompts per persona (default: all)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--serve-new", type=int, default=16, help="new tokens per request in the serving measurement")
    parser.add_argument("--serve-reps", type=int, default=2)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--out", default="adapter_vs_prompt", help="result name under docs/results/")
    args = parser.parse_args()
    if args.quick or args.tiny:
        args.personas = args.personas or QUICK_PERSONAS
        args.eval_n = args.eval_n or 6
    if args.tiny:
        args.base, args.steps, args.max_new_tokens, args.serve_new, args.serve_reps = "tiny", 2, 8, 4, 1
        args.k = 1  # the tiny model holds 512 positions; its byte-level tokenizer makes long prompts
    args.personas = args.personas or DEFAULT_PERSONAS

    from _common import console, markdown_table, show, write_result

    from lorafleet.adapters import LoraAdapter, LoraSpec, from_bytes, to_bytes
    from lorafleet.base import load_base
    from lorafleet.config import quiet_libraries
    from lorafleet.evaluation.baselines import CONDITIONS, USES_ADAPTER, condition_prompts, evaluate_conditions
    from lorafleet.evaluation.personas import get_persona
    from lorafleet.serving.engine import Engine, EngineConfig, SamplingParams
    from lorafleet.serving.residency import READY
    from lorafleet.serving.sources import DictBlobs
    from lorafleet.training.trainer import MultiTenantTrainer, TrainConfig

    quiet_libraries()
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    personas = [get_persona(n.strip()) for n in args.personas.split(",") if n.strip()]
    base = load_base(args.base)

    # -- train: the CLI defaults, every persona packed into the same steps -------------------------------------
    spec = LoraSpec(rank=8, alpha=16.0, target_modules="all")
    cfg = TrainConfig(steps=args.steps, lr=1e-3, batch_size=4, max_len=256, seed=0)
    trainer = MultiTenantTrainer(base)
    for p in personas:
        trainer.add(p.name, LoraAdapter.create(base, spec, seed=0), p.data().train_dataset(), cfg)
    t1 = time.perf_counter()
    for step in range(args.steps):
        losses = trainer.step()
        if step % 5 == 4 or step == args.steps - 1:
            console.print(f"step {step + 1}/{args.steps}: mean loss {statistics.fmean(losses.values()):.3f} "
                          f"({time.perf_counter() - t1:.0f} s)")
    train_s = time.perf_counter() - t1
    adapters = {p.name: from_bytes(to_bytes(trainer.users[p.name].adapter), base) for p in personas}

    # -- adherence: five conditions on the same held-out prompts ---------------------------------------------
    t2 = time.perf_counter()
    results, prompts_by = {}, {}
    for p in personas:
        d = p.data()
        evals = d.eval[: args.eval_n] if args.eval_n else d.eval
        results[p.name] = evaluate_conditions(base, p, d.train, evals, adapter=adapters[p.name], k=args.k,
                                              max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch)
        prompts_by[p.name] = {c: condition_prompts(c, [r["messages"][0]["content"] for r in evals], d.train,
                                                   description=p.describe(), k=args.k) for c in CONDITIONS}
        row = "  ".join(f"{c} {results[p.name][c]['passed']}/{results[p.name][c]['count']}" for c in CONDITIONS)
        console.print(f"{p.name} ({p.category}): {row}  ({time.perf_counter() - t2:.0f} s)")
    eval_s = time.perf_counter() - t2

    # -- serving cost of each condition's prompts, on the engine -----------------------------------------------
    blobs = DictBlobs()
    digests = {name: blobs.put(a) for name, a in adapters.items()}
    n_requests = sum(len(prompts_by[p.name]["base"]) for p in personas)
    engine = Engine(base, blobs, EngineConfig(max_batch=max(8, n_requests), max_active=max(8, len(personas)),
                                              max_rank=8, max_prefill_tokens=2048))
    engine.prefetch(list(digests.values()))
    deadline = time.monotonic() + 300
    while any(engine.residency.state(dg) != READY for dg in digests.values()):
        if time.monotonic() > deadline:
            raise TimeoutError("adapters did not load")
        engine.step()
        time.sleep(0.002)
    params = SamplingParams(max_tokens=args.serve_new, ignore_eos=True)
    serving = {}
    for c in CONDITIONS:
        msgs, adps = [], []
        for p in personas:
            msgs += prompts_by[p.name][c]
            adps += [digests[p.name] if USES_ADAPTER[c] else None] * len(prompts_by[p.name][c])
        engine.generate(msgs[:2], adps[:2], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
        best = None
        for _ in range(args.serve_reps):
            t = time.perf_counter()
            out = engine.generate(msgs, adps, params)
            wall = time.perf_counter() - t
            bad = [r.error for r in out if not r.ok]
            if bad:
                raise RuntimeError(f"engine errors: {bad[:2]}")
            rec = {"wall": wall, "tok_s": sum(r.completion_tokens for r in out) / wall,
                   "ttft": statistics.fmean(r.timings["ttft_s"] for r in out),
                   "prompt_tokens": statistics.fmean(r.prompt_tokens for r in out)}
            best = rec if best is None or rec["wall"] < best["wall"] else best
        serving[c] = best
        console.print(f"serving {c}: {best['prompt_tokens']:.0f} prompt tokens, {best['tok_s']:.1f} tok/s, "
                      f"TTFT {best['ttft'] * 1000:.0f} ms")
    engine.close()
    load_end = os.getloadavg()

    # -- tables ------------------------------------------------------------------------------------------------
    headers = ["condition", *[f"{p.name} ({p.category})" for p in personas], "all personas",
               "prompt tokens / request", "engine tok/s", "engine TTFT ms"]
    rows = []
    for c in CONDITIONS:
        passed = sum(results[p.name][c]["passed"] for p in personas)
        count = sum(results[p.name][c]["count"] for p in personas)
        s = serving[c]
        rows.append([LABELS[c], *[f"{results[p.name][c]['passed']}/{results[p.name][c]['count']}" for p in personas],
                     f"{passed}/{count} ({passed / count:.0%})", f"{s['prompt_tokens']:.0f}", f"{s['tok_s']:.1f}",
                     f"{s['ttft'] * 1000:.0f}"])
    title = f"held-out adherence and serving cost per condition ({base.name}, k={args.k})"
    show(title, headers, rows)
    sample_rows = []
    for p in personas:
        for c in CONDITIONS:
            text = results[p.name][c]["responses"][0].replace("\n", " ⏎ ").replace("|", "\\|")
            sample_rows.append([p.name, LABELS[c], text[:140]])
    total_s = time.perf_counter() - t0
    summary = (f"training {train_s:.0f} s ({args.steps} packed steps, {len(personas)} personas), adherence "
               f"evaluation {eval_s:.0f} s, total {total_s:.0f} s")
    console.print(summary)
    if args.tiny:
        return 0
    n_eval = sum(results[p.name]["base"]["count"] for p in personas)
    notes = "\n".join([
        f"- mode: {'--quick (2 personas, 6 held-out prompts each)' if args.quick else 'full'}; {summary}.",
        f"- load average (1, 5, 15 min) at start {', '.join(f'{x:.1f}' for x in load_start)}, at end "
        f"{', '.join(f'{x:.1f}' for x in load_end)}: the machine (2 cores) was shared with other jobs, so the "
        "absolute times are noisy; the conditions were measured back to back in one process.",
        f"- training: `MultiTenantTrainer`, the `lorafleet train` defaults (rank 8, alpha 16, targets all, "
        f"{args.steps} steps, lr 1e-3, 4 rows per step, max_len 256), {personas[0].n_train} training examples per "
        "persona (memory personas ship 16 train / 8 held out).",
        f"- adherence: {n_eval} held-out prompts in all, never seen in training, greedy, at most "
        f"{args.max_new_tokens} new tokens, scored by the persona's checker (`lorafleet.evaluation.habits`). "
        "In-context = a system prompt from the persona's description + its first "
        f"{args.k} training examples as earlier turns; retrieval = the {args.k} training examples whose user turn is "
        "most similar to the held-out prompt (BM25, `rank_bm25`), no description; adapter + in-context = the "
        "adapter with the in-context prompt.",
        f"- serving cost: the engine (`lorafleet.serving.engine`), float32 on CPU; per condition the same "
        f"{n_requests} requests submitted together (adapter conditions: each on its persona's adapter), "
        f"{args.serve_new} new tokens each (ignore_eos), best of {args.serve_reps} after a warm-up. tok/s = generated "
        "tokens / wall time; TTFT = mean time from submit to first token (includes waiting for the batch's prefill).",
        "- small samples: one prompt of 6 is 17 points; read the table as a direction, not a ranking.",
    ])
    write_result(args.out, "Adapters vs the prompt: held-out adherence and serving cost",
                 [(title, markdown_table(headers, rows)),
                  ("First held-out response per persona and condition", markdown_table(
                      ["persona", "condition", "response (first 140 characters)"], sample_rows))], notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
