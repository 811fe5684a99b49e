"""How hard may a personal model be trained before it costs the base its competence: learning rate vs adherence,
the competence probe and the gate's verdict, per base.

``personal_vs_prompt.py`` trains with the ``lorafleet train`` defaults (rank 8 on every projection, alpha 16, 30
steps, 4 rows per step, max_len 256, lr 1e-3). On Gemma-3-270M those adapters kept 33% of the base's probe answers
and raised its plain-text perplexity 3.5x (docs/results/lr_competence_gemma3-270m.md), so the gate refuses them all. This benchmark keeps everything but the
learning rate and, for each lr, trains the same personas (packed, one trainer per lr), then measures on the same
held-out prompts, through the serving engine: habit adherence, held-out loss, the competence probe (retention of
the base's correct answers, perplexity ratio on plain text) and what the promotion gate decides against the base
(its default thresholds: ppl <= x1.5, retention >= 75%, adherence above the base's).

    python benchmarks/lr_competence.py                              # SmolLM2, lr 1e-3 / 3e-4 / 1e-4
    python benchmarks/lr_competence.py --base gemma3-270m           # -> docs/results/lr_competence_gemma3-270m.md
    python benchmarks/lr_competence.py --quick                      # tiny model, seconds, writes nothing
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_PERSONAS = "ahab,greta,quiet,metric,veggie,lisboeta"  # 3 format + 3 memory, as in the scale grids


def refusal(why: str) -> str:
    """The gate's reason for a refusal, in a word or two (its first failed rule)."""
    if why.startswith("competence probe failed: perplexity"):
        return "ppl"
    if why.startswith("competence probe failed: kept"):
        return "retention"
    if why.startswith("competence probe missing"):
        return "no probe"
    return "adherence floor" if "below the floor" in why else "no gain over the base"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 personas; writes nothing")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--lrs", default="1e-3,3e-4,1e-4", help="comma list of learning rates")
    parser.add_argument("--personas", default=DEFAULT_PERSONAS)
    parser.add_argument("--seeds", type=int, default=1, help="adapter seeds per persona and lr")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: lorafleet train's)")
    parser.add_argument("--eval-n", type=int, default=16, help="held-out prompts per persona")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default=None, help="result name under docs/results/ (default lr_competence_<base>)")
    args = parser.parse_args(argv)
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--lrs must be a comma list of numbers, got {args.lrs!r}")
    if not lrs or any(lr <= 0 for lr in lrs):
        parser.error(f"--lrs must name at least one positive learning rate, got {args.lrs!r}")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.quick:
        args.base, args.personas, args.eval_n, args.max_new_tokens = "tiny", "quiet,veggie", 2, 4

    from _common import console, markdown_table, show, write_result

    from lorafleet.adapters import LoraAdapter, LoraSpec, from_bytes, to_bytes
    from lorafleet.base import load_base
    from lorafleet.config import quiet_libraries
    from lorafleet.evaluation.engine_backend import EngineBackend
    from lorafleet.evaluation.gate import GateConfig, decide
    from lorafleet.evaluation.metrics import EvalSet, evaluate_adapters, wilson_interval
    from lorafleet.evaluation.personas import Persona, get_persona
    from lorafleet.serving.params import EngineConfig
    from lorafleet.training.trainer import MultiTenantTrainer, TrainConfig

    quiet_libraries()
    defaults = TrainConfig()
    steps = args.steps or (2 if args.quick else defaults.steps)
    personas = []
    for name in (n.strip() for n in args.personas.split(",") if n.strip()):
        p = get_persona(name)
        personas.append(Persona(name=p.name, habit=p.habit, params=p.params, seed=p.seed, n_train=p.n_train,
                                n_eval=min(args.eval_n, p.n_eval)))
    base = load_base(args.base)
    spec = LoraSpec(rank=8, alpha=16.0, target_modules="all")  # lorafleet train's defaults
    console.print(f"base {base.name}; {len(personas)} personas x {args.seeds} seed(s) per lr; lrs {lrs}; {steps} steps")

    # -- train: one packed trainer per lr (bounds the packed batch's logits memory) ------------------------------
    jobs = {lr: {f"{lr}:{p.name}:{s}": (p, s) for p in personas for s in range(args.seeds)} for lr in lrs}
    adapters, train_s, train_loss = {}, {}, {}
    for lr in lrs:
        trainer = MultiTenantTrainer(base)
        for key, (p, s) in jobs[lr].items():
            cfg = TrainConfig(steps=steps, lr=lr, batch_size=defaults.batch_size, max_len=defaults.max_len, seed=s)
            trainer.add(key, LoraAdapter.create(base, spec, seed=s), p.data().train_dataset(), cfg)
        t0 = time.perf_counter()
        for step in range(steps):
            losses = trainer.step()
            if step % 10 == 9 or step == steps - 1:
                console.print(f"lr {lr:g}: step {step + 1}/{steps}, mean loss {statistics.fmean(losses.values()):.3f} "
                              f"({time.perf_counter() - t0:.0f} s)")
        train_s[lr] = time.perf_counter() - t0
        train_loss[lr] = statistics.fmean(losses.values())
        adapters.update({key: from_bytes(to_bytes(u.adapter), base) for key, u in trainer.users.items()})
        del trainer

    # -- evaluate every adapter on its persona's held-out prompts, the probe included ----------------------------
    t1 = time.perf_counter()
    sets = {p.name: EvalSet.from_persona(p) for p in personas}
    keys = list(adapters)
    eval_set = {key: sets[p.name] for per_lr in jobs.values() for key, (p, _s) in per_lr.items()}
    backend = EngineBackend(base, config=EngineConfig(max_batch=32, max_active=32, max_cached=64, max_rank=16))
    try:
        for a in adapters.values():
            backend.add(a)
        metrics = dict(zip(keys, evaluate_adapters(base, [adapters[k] for k in keys],
                                                    [eval_set[k] for k in keys],
                                                    max_new_tokens=args.max_new_tokens, backend=backend), strict=True))
    finally:
        backend.close()
    eval_s = time.perf_counter() - t1

    # -- aggregate per lr ------------------------------------------------------------------------------------------
    gate_cfg = GateConfig()
    headers = ["lr", "adherence", "95% CI (all answers)", "format", "memory", "held-out loss", "final train loss",
               "probe retention (mean, min)", "probe ppl × (mean, max)", "gate would promote", "refusals"]
    rows = []
    first = metrics[keys[0]]
    rows.append(["base (no adapter)", f"{statistics.fmean(metrics[k]['base_adherence'] for k in jobs[lrs[0]]):.0%}",
                 "", "", "", f"{statistics.fmean(m['base_eval_loss'] for m in metrics.values()):.3f}", "", "100%", "1.00",
                 "", ""])
    for lr in lrs:
        ms = [(k, metrics[k]) for k in jobs[lr]]
        size = {k: len(eval_set[k].user_prompts) for k, _ in ms}
        n, passed = sum(size.values()), sum(round(m["adherence"] * size[k]) for k, m in ms)
        lo, hi = wilson_interval(passed, n)
        cat = {c: [m["adherence"] for k, m in ms if jobs[lr][k][0].category == c] for c in ("format", "memory")}
        ret = [m["probe_retention"] for _, m in ms if m.get("probe_retention") is not None]
        ppl = [m["probe_ppl_ratio"] for _, m in ms if m.get("probe_ppl_ratio") is not None]
        verdicts = [decide(m, {"adherence": m["base_adherence"], "eval_loss": m["base_eval_loss"]}, gate_cfg,
                           reference_name="base") for _, m in ms]
        refused = [refusal(why) for ok, why in verdicts if not ok]
        reasons = ", ".join(f"{r} x{refused.count(r)}" for r in sorted(set(refused))) or "-"
        console.print(f"lr {lr:g}: adherence {passed}/{n}, probe retention "
                      f"{statistics.fmean(ret) if ret else float('nan'):.0%}, ppl x"
                      f"{statistics.fmean(ppl) if ppl else float('nan'):.2f}; the gate would promote "
                      f"{len(verdicts) - len(refused)}/{len(verdicts)} (refused: {reasons})", highlight=False)
        rows.append([f"{lr:g}", f"{passed / n:.0%}", f"{lo:.0%}–{hi:.0%} (n={n})",
                     f"{statistics.fmean(cat['format']):.0%}" if cat["format"] else "-",
                     f"{statistics.fmean(cat['memory']):.0%}" if cat["memory"] else "-",
                     f"{statistics.fmean(m['eval_loss'] for _, m in ms):.3f}", f"{train_loss[lr]:.3f}",
                     f"{statistics.fmean(ret):.0%}, {min(ret):.0%}" if ret else "-",
                     f"{statistics.fmean(ppl):.2f}, {max(ppl):.2f}" if ppl else "-",
                     f"{len(verdicts) - len(refused)}/{len(verdicts)}", reasons])
    title = f"learning rate vs adherence and competence ({base.name}, {len(personas)} personas x {args.seeds} seed(s))"
    show(title, headers, rows)
    per_persona_headers = ["persona", "kind", *(f"lr {lr:g}: adherence / retention / ppl ×" for lr in lrs)]
    per_persona = []
    for p in personas:
        cells = []
        for lr in lrs:
            ms = [metrics[f"{lr}:{p.name}:{s}"] for s in range(args.seeds)]
            cells.append(f"{statistics.fmean(m['adherence'] for m in ms):.0%} / "
                         f"{statistics.fmean(m['probe_retention'] for m in ms):.0%} / "
                         f"{statistics.fmean(m['probe_ppl_ratio'] for m in ms):.2f}")
        per_persona.append([p.name, p.category, *cells])
    grid = (f"base `{base.name}`; personas {', '.join(p.name for p in personas)}; {args.seeds} seed(s) per lr; LoRA "
            f"rank {spec.rank} on every projection, alpha {spec.alpha:g}; {steps} steps x {defaults.batch_size} rows, "
            f"max_len {defaults.max_len} (the `lorafleet train` defaults except lr); {args.eval_n} held-out prompts "
            f"per persona, greedy, {args.max_new_tokens} new tokens, through the serving engine; training "
            + ", ".join(f"{train_s[lr]:.0f} s at lr {lr:g}" for lr in lrs) + f"; evaluation {eval_s:.0f} s "
            f"(base probe ppl {first['base_probe_ppl']:.2f}).")
    notes = (
        "- probe retention = share of the base's correct answers to the competence probe's questions that the "
        "adapter still gets right; probe ppl × = plain-text perplexity under the adapter / the base's. The gate's "
        f"defaults: ppl ≤ x{gate_cfg.max_ppl_ratio:g}, retention ≥ {gate_cfg.min_probe_retention:.0%}, adherence "
        "above the base's by its margin (here the reference is the base, as for a user's first revision).\n"
        "- refusals name the gate's first failed rule for each refused adapter.\n"
        "- 95% CI = Wilson score interval over every checked answer of the row (personas x seeds x prompts).")
    if args.quick:
        console.print("quick run: nothing written")
        return 0
    write_result(args.out or f"lr_competence_{base.name}", "Learning rate vs adherence and competence",
                 [(title, markdown_table(headers, rows)), ("Grid", grid),
                  ("Per persona (mean over seeds)", markdown_table(per_persona_headers, per_persona))], notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
