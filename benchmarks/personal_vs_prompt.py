"""Does a personal model earn its bytes? Adapters against the user put in the prompt, format and memory personas.

    python benchmarks/personal_vs_prompt.py                      # 12 personas x 3 seeds on SmolLM2-135M-Instruct
    python benchmarks/personal_vs_prompt.py --seeds 1 --personas ahab,veggie --eval-n 4   # a smaller grid
    python benchmarks/personal_vs_prompt.py --quick              # the tiny random model, seconds; writes nothing

Each (persona, seed) gets one adapter trained with the CLI defaults (``lorafleet train``: rank 8, alpha 16, all
projections, 30 steps, lr 1e-3, 4 rows per step, max_len 256); every adapter of the grid is packed into the same
steps of one ``MultiTenantTrainer``. The seed sets the adapter's initialisation and the order its examples are
drawn in; the persona's data is the same for every seed. Then, on the same held-out prompts, the five conditions of
:mod:`lorafleet.evaluation.baselines` (``compare_conditions``, the very code ``lorafleet eval`` runs): base, base +
in-context profile (system prompt from the persona's description + its first k training examples), base +
retrieval (the k most similar training examples, BM25), adapter, adapter + in-context. Columns: held-out adherence
(the persona's checker, greedy), held-out loss of the reference answer, the competence probe, prompt tokens per
request and the serving cost of that prompt length on the engine (every persona's held-out requests submitted
together, a fixed number of new tokens: generated tok/s and mean time to first token).

The base conditions do not depend on the adapter seed (greedy decoding, same prompts), so they are measured once;
their spread is the 95% interval over prompts only. Adapter rows: mean ± std over seeds, and the same interval.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FORMAT = "ahab,greta,lister,quiet,splendid"
MEMORY = "metric,veggie,lisboeta,priya,biscuit,rustacean,plain"
DEFAULT_PERSONAS = f"{FORMAT},{MEMORY}"
QUICK_PERSONAS = "quiet,veggie"
LABELS = {"base": "base", "in_context": "base + in-context", "retrieval": "base + retrieval (BM25)",
          "adapter": "adapter", "adapter_in_context": "adapter + in-context"}


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.fmean(xs):.0%} ± {statistics.stdev(xs):.0%}" if len(xs) > 1 else f"{xs[0]:.0%}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 personas, 2 seeds; writes nothing")
    parser.add_argument("--personas", default=None, help=f"comma list of shipped personas (default {DEFAULT_PERSONAS})")
    parser.add_argument("--seeds", type=int, default=3, help="adapter seeds per persona")
    parser.add_argument("--k", type=int, default=4, help="examples in context (in-context and retrieval)")
    parser.add_argument("--eval-n", type=int, default=16,
                        help="held-out prompts per persona, at most its own n_eval (16 for every shipped persona)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--serve-new", type=int, default=16, help="new tokens per request in the serving measurement")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--precision", default="auto", help="base precision (lorafleet.base.precision.PRECISIONS)")
    parser.add_argument("--out", default="personal_vs_prompt", help="result name under docs/results/")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    parser.add_argument("--train-group", type=int, default=6, help="adapters packed per trainer (bounds memory)")
    parser.add_argument("--probe-conditions", default="in_context,adapter,adapter_in_context",
                        help="conditions the competence probe runs under (the base's answers are always measured)")
    args = parser.parse_args()
    if args.quick:
        args.personas = args.personas or QUICK_PERSONAS
        args.base, args.steps, args.max_new_tokens, args.serve_new, args.eval_n = "tiny", 2, 4, 2, 2
        args.seeds = min(args.seeds, 2)
        args.k, args.no_write = 1, True  # the tiny model holds 512 positions; its byte-level tokenizer is long
    args.personas = args.personas or DEFAULT_PERSONAS
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")

    from _common import console, markdown_table, show, write_result

    from lorafleet.adapters import LoraAdapter, LoraSpec, from_bytes, to_bytes
    from lorafleet.base import load_base
    from lorafleet.config import quiet_libraries
    from lorafleet.evaluation.baselines import CONDITIONS, BaselineConfig, Profile, compare_conditions
    from lorafleet.evaluation.metrics import EvalSet, perplexities, wilson_interval
    from lorafleet.evaluation.personas import Persona, get_persona
    from lorafleet.training.trainer import MultiTenantTrainer, TrainConfig

    quiet_libraries()
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    personas = []
    for name in (n.strip() for n in args.personas.split(",") if n.strip()):
        p = get_persona(name)
        personas.append(Persona(p.name, p.habit, p.params, seed=p.seed, n_train=p.n_train,
                                n_eval=min(p.n_eval, args.eval_n)))
    seeds = list(range(args.seeds))
    base = load_base(args.base, precision=args.precision)

    # -- train: every (persona, seed) packed into the same steps, the CLI defaults ------------------------------
    spec = LoraSpec(rank=8, alpha=16.0, target_modules="all")
    jobs = [(p, s) for p in personas for s in seeds]
    adapters, train_s = {}, 0.0
    for g in range(0, len(jobs), args.train_group):  # groups bound the packed batch's memory (logits of every row)
        trainer = MultiTenantTrainer(base)
        for p, s in jobs[g : g + args.train_group]:
            cfg = TrainConfig(steps=args.steps, lr=1e-3, batch_size=4, max_len=256, seed=s)
            trainer.add(f"{p.name}:{s}", LoraAdapter.create(base, spec, seed=s), p.data().train_dataset(), cfg)
        t1 = time.perf_counter()
        for step in range(args.steps):
            losses = trainer.step()
            if step % 5 == 4 or step == args.steps - 1:
                console.print(f"group {g // args.train_group + 1}, step {step + 1}/{args.steps}: mean loss "
                              f"{statistics.fmean(losses.values()):.3f} ({time.perf_counter() - t1:.0f} s, "
                              f"{len(trainer.users)} adapters)")
        train_s += time.perf_counter() - t1
        adapters.update({key: from_bytes(to_bytes(u.adapter), base) for key, u in trainer.users.items()})
        del trainer

    # -- five conditions on the same held-out prompts ------------------------------------------------------------
    t2 = time.perf_counter()
    sets = {p.name: EvalSet.from_persona(p) for p in personas}
    profiles = {p.name: Profile.from_persona(p) for p in personas}
    first = [{"eval_set": sets[p.name], "profile": profiles[p.name], "adapter": adapters[f"{p.name}:0"]}
             for p in personas]
    cfg0 = BaselineConfig(conditions=CONDITIONS, k=args.k, probe=True, serving=True, serve_tokens=args.serve_new,
                          probe_conditions=tuple(c.strip() for c in args.probe_conditions.split(",") if c.strip()))
    reports = {(p.name, 0): r for p, r in zip(personas, compare_conditions(
        base, first, cfg0, max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch), strict=True)}
    console.print(f"seed 0: five conditions, probe and serving measured ({time.perf_counter() - t2:.0f} s)")
    if len(seeds) > 1:  # the base conditions do not depend on the adapter seed; the probe is measured on seed 0
        rest = [{"eval_set": sets[p.name], "profile": profiles[p.name], "adapter": adapters[f"{p.name}:{s}"],
                 "conditions": ("adapter", "adapter_in_context"), "key": (p.name, s)} for p in personas for s in seeds[1:]]
        cfg_rest = BaselineConfig(conditions=CONDITIONS, k=args.k, probe=False, serving=False)
        for item, r in zip(rest, compare_conditions(base, rest, cfg_rest, max_new_tokens=args.max_new_tokens,
                                                   batch_size=args.gen_batch), strict=True):
            reports[item["key"]] = r
        console.print(f"seeds 1..{len(seeds) - 1}: adapter conditions ({time.perf_counter() - t2:.0f} s)")
    keys = [f"{p.name}:{s}" for p, s in jobs]
    ppl = perplexities(base, [None, *(adapters[k] for k in keys)])
    ppl_ratio = {k: ppl[i + 1] / ppl[0] for i, k in enumerate(keys)}
    eval_s = time.perf_counter() - t2
    load_end = os.getloadavg()

    # -- aggregate -----------------------------------------------------------------------------------------------
    def row_of(name, s, c):
        return reports[(name, 0 if c in ("base", "in_context", "retrieval") else s)]["rows"][c]

    recall_prompts = {p.name: {i.prompt for i in (p.habit_obj.recall() if hasattr(p.habit_obj, "recall") else [])}
                      for p in personas}

    def pooled(c, s, which):
        passed = n = 0
        for p in personas:
            if which not in ("all", p.category) and which not in ("apply", "recall"):
                continue
            r = row_of(p.name, s, c)
            for prompt, ok in zip(sets[p.name].user_prompts, r["passed_each"], strict=True):
                if which in ("apply", "recall"):
                    if p.category != "memory" or (prompt in recall_prompts[p.name]) != (which == "recall"):
                        continue
                passed += ok
                n += 1
        return passed, n

    main_headers = ["condition", "adherence (mean ± std over seeds)", "95% CI (pooled prompts)", "format", "memory",
                    "memory: applied", "memory: recalled", "held-out loss", "probe retention", "probe ppl ×",
                    "prompt tokens / request", "tokens vs adapter", "engine tok/s", "engine TTFT ms"]
    main_rows = []
    adapter_tokens = statistics.fmean(row_of(p.name, 0, "adapter")["prompt_tokens"] for p in personas)
    summary_numbers = {}
    for c in CONDITIONS:
        per_seed = seeds if c in ("adapter", "adapter_in_context") else [0]
        rates = {w: [pooled(c, s, w) for s in per_seed] for w in ("all", "format", "memory", "apply", "recall")}
        allp = sum(a for a, _ in rates["all"])
        alln = sum(b for _, b in rates["all"])
        lo, hi = wilson_interval(allp, alln)
        tokens = statistics.fmean(row_of(p.name, 0, c)["prompt_tokens"] for p in personas)
        loss = [row_of(p.name, s, c)["eval_loss"] for p in personas for s in per_seed]
        retention = [row_of(p.name, 0, c)["probe_retention"] for p in personas]
        retention = [x for x in retention if x is not None]
        serving = reports[(personas[0].name, 0)]["rows"][c]
        ratio = (statistics.fmean(ppl_ratio[f"{p.name}:{s}"] for p in personas for s in seeds)
                 if c == "adapter" else None)
        summary_numbers[c] = {"adherence": allp / alln, "tokens": tokens}
        console.print(f"{LABELS[c]}: adherence {allp}/{alln}, {tokens:.0f} prompt tokens / request, engine "
                      f"{serving['tok_s']:.1f} tok/s, TTFT {serving['ttft_ms']} ms", highlight=False)

        def frac(ws):
            return mean_std([a / b if b else None for a, b in ws])

        main_rows.append([
            LABELS[c], mean_std([a / b for a, b in rates["all"]]), f"{lo:.0%}–{hi:.0%} (n={alln})", frac(rates["format"]),
            frac(rates["memory"]), frac(rates["apply"]), frac(rates["recall"]),
            f"{statistics.fmean(x for x in loss if x is not None):.3f}" if any(x is not None for x in loss) else "-",
            f"{statistics.fmean(retention):.0%}" if retention else "-", f"{ratio:.2f}" if ratio else "-",
            f"{tokens:.0f}", f"{tokens / adapter_tokens:.1f}x", f"{serving['tok_s']:.1f}",
            f"{serving['ttft_ms']:.0f}" if serving["ttft_ms"] is not None else "-"])
    title = (f"held-out adherence, competence and serving cost per condition ({base.name}, {len(personas)} personas, "
             f"{len(seeds)} seed(s), k={args.k})")
    show(title, main_headers, main_rows)

    persona_headers = ["persona", "kind", "description", *[LABELS[c] for c in CONDITIONS]]
    persona_rows = []
    for p in personas:
        kind = p.category if p.category == "format" else ("memory (recall + apply)" if recall_prompts[p.name]
                                                          else "memory (apply)")
        cells = []
        for c in CONDITIONS:
            per_seed = seeds if c in ("adapter", "adapter_in_context") else [0]
            cells.append(mean_std([row_of(p.name, s, c)["adherence"] for s in per_seed]))
        persona_rows.append([p.name, kind, p.describe()[:60], *cells])
    show("adherence per persona (mean ± std over seeds)", persona_headers, persona_rows)

    ic, ad = summary_numbers["in_context"], summary_numbers["adapter"]
    verdict = (f"adapter {ad['adherence']:.0%} at {ad['tokens']:.0f} prompt tokens vs in-context {ic['adherence']:.0%} "
               f"at {ic['tokens']:.0f}: {ic['tokens'] / ad['tokens']:.1f}x fewer prompt tokens; goal (match or beat at "
               f">= 5x fewer) {'met' if ad['adherence'] >= ic['adherence'] and ic['tokens'] / ad['tokens'] >= 5 else 'NOT met'}")
    console.print(verdict)
    total_s = time.perf_counter() - t0
    summary = (f"training {train_s:.0f} s ({args.steps} packed steps, {len(keys)} adapters), evaluation "
               f"{eval_s:.0f} s, total {total_s:.0f} s")
    console.print(summary)
    if args.no_write:
        return 0
    n_eval = sum(len(sets[p.name]) for p in personas)
    notes = "\n".join([
        f"- grid: {len(personas)} personas ({', '.join(p.name for p in personas)}), {len(seeds)} adapter seed(s), "
        f"{n_eval} held-out prompts in all (at most {args.eval_n} per persona), k={args.k}; {summary}.",
        f"- verdict: {verdict}.",
        f"- load average (1, 5, 15 min) at start {', '.join(f'{x:.1f}' for x in load_start)}, at end "
        f"{', '.join(f'{x:.1f}' for x in load_end)} (2 cores; the run's own load is about 2); absolute times are "
        "noisy, the conditions were measured back to back in one process.",
        f"- training: `MultiTenantTrainer`, the `lorafleet train` defaults (rank 8, alpha 16, targets all, "
        f"{args.steps} steps, lr 1e-3, 4 rows per step, max_len 256); format personas ship 48 training examples, "
        "memory personas 16. The seed sets the adapter's initialisation and example order, not the data.",
        f"- adherence: greedy, at most {args.max_new_tokens} new tokens, the persona's checker "
        "(`lorafleet.evaluation.habits`). Spreads: adapter rows mean ± std of the pooled rate over seeds; base rows "
        "are deterministic (one measurement, no seed spread); the 95% CI is Wilson's over all pooled prompts "
        "(seeds pooled for the adapter rows). 'memory: recalled' = held-out prompts that ask for the fact directly "
        "(the conversations in training only use it in passing); 'applied' = the fact used without being asked.",
        "- held-out loss: mean NLL per token of the reference held-out answer under each condition's prompt (only "
        "that answer is scored, not the in-context examples). Probe: the competence probe's questions asked under "
        f"the prompt of {args.probe_conditions} (seed 0; '-' = not run), retention = share of the base's correct "
        "answers kept; probe ppl × = the "
        "adapter's plain-text perplexity over the base's (the gate's bound is 1.5x, retention ≥ 75%).",
        f"- serving cost: the engine (`lorafleet.serving.engine`), base precision {base.precision_label}; per condition every persona's "
        f"held-out requests submitted together (adapter conditions: each on its seed-0 adapter), {args.serve_new} new "
        "tokens each (ignore_eos), after a warm-up. tok/s = generated tokens / wall time; TTFT = mean time from submit "
        "to first token (includes waiting for the batch's prefill).",
    ])
    write_result(args.out, "Personal models vs the prompt: adherence, competence and serving cost",
                 [(title, markdown_table(main_headers, main_rows)),
                  ("Adherence per persona (mean ± std over seeds)", markdown_table(persona_headers, persona_rows))],
                 notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
