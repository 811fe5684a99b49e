"""Personas -> packed training through the job queue -> registry -> evaluation -> gate.

    python benchmarks/persona_gate.py            # shipped personas on SmolLM2-135M-Instruct, rank 4
    python benchmarks/persona_gate.py --quick    # tiny model smoke run (nothing written)

One rank-4 adapter per persona, all trained in the same optimizer steps (the job queue's worker packs them);
each finished job is a registry revision (``candidate``). Every revision is evaluated on its persona's
held-out prompts next to the base (habit adherence by the persona's checker, held-out loss, competence
probe), then gated. Finally the first persona gets two more revisions the gate must refuse — its trained deltas
amplified x4 (competence breaks) and an adapter that learned nothing (equal to the base) — then a forced
promotion is audited and a rollback restores the first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Six habit kinds of different difficulty (the three left out, greeting / signature word / max words, are close
# cousins of these); `--personas all` runs every shipped persona.
DEFAULT_PERSONAS = "ahab,lister,quiet,wxbot,metric,jsonic"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 personas, a few steps; writes nothing")
    parser.add_argument("--personas", default=DEFAULT_PERSONAS, help="comma list of shipped persona names, or all")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", default="all")
    parser.add_argument("--batch", type=int, default=4, help="rows per persona per step")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gen-batch", type=int, default=48, help="rows per generation batch")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    args = parser.parse_args()
    if args.quick:
        args.base, args.steps, args.max_new_tokens = "tiny", 3, 8
        args.personas = ",".join(args.personas.split(",")[:3])

    from _common import console, markdown_table, show, write_result
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lorafleet.adapters import LoraAdapter, LoraSpec, from_bytes, to_bytes
    from lorafleet.base import load_base
    from lorafleet.config import quiet_libraries
    from lorafleet.evaluation import gate as gatemod
    from lorafleet.evaluation import probe
    from lorafleet.evaluation.metrics import EvalSet, evaluate_revisions
    from lorafleet.evaluation.personas import get_persona, shipped_personas
    from lorafleet.registry import Provenance, Registry
    from lorafleet.training.jobs import JobQueue
    from lorafleet.training.trainer import TrainConfig
    from lorafleet.training.worker import Worker, WorkerConfig

    quiet_libraries()
    if args.personas == "all":
        personas = shipped_personas()
    else:
        personas = [get_persona(n.strip()) for n in args.personas.split(",") if n.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="persona-gate-"))
    reg = Registry(f"sqlite:///{tmp / 'registry.db'}", str(tmp / "blobs"))
    t0 = time.perf_counter()
    with console.status(f"loading {args.base}…"):
        base = load_base(args.base)
    load_s = time.perf_counter() - t0

    # -- train: one job per persona, packed into the same steps by one worker --------------------------
    spec = LoraSpec(rank=args.rank, alpha=args.alpha, target_modules=args.targets)
    cfg = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch, max_len=128, seed=0)
    queue = JobQueue(reg)
    refs = {}
    for p in personas:
        ref = f"bench/{p.name}/assistant"
        reg.create_adapter(ref, creator="benchmark")
        queue.submit(ref, p.data().train_dataset(), spec, cfg, creator="benchmark", warm_start="none")
        refs[p.name] = ref
    with Progress(TextColumn("training {task.fields[n]} personas (packed)"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("mean loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("train", total=args.steps, n=len(personas), loss=float("nan"))
        seen: dict[int, float] = {}

        def on_progress(job_id: int, step: int, total: int, loss: float) -> None:
            seen[job_id] = loss
            bar.update(task, completed=step, loss=sum(seen.values()) / len(seen))
            if not console.is_terminal and len(seen) == len(personas):  # a log file gets one line per step
                console.print(f"step {step}/{total}: mean loss {sum(seen.values()) / len(seen):.3f} "
                              f"({time.perf_counter() - t1:.0f} s)")
                seen.clear()

        t1 = time.perf_counter()
        # A packed step of many personas can take minutes on a busy 2-core machine: a long lease keeps the jobs.
        worker = Worker(reg, base, WorkerConfig(max_jobs=len(personas), checkpoint_every=args.steps,
                                                lease_seconds=3600.0),
                        on_progress=on_progress)
        finished = worker.run(until_idle=True)
        train_s = time.perf_counter() - t1
    failed = [j for j in finished if j.state != "succeeded"]
    if failed:
        console.print(f"[red]jobs failed:[/] {[(j.ref, j.error) for j in failed]}")
        return 1

    # -- evaluate every revision (shared batches, base side by side), then gate each --------------------
    addresses = [f"{refs[p.name]}#1" for p in personas]
    eval_sets = [EvalSet.from_persona(p) for p in personas]
    rows_total = sum(len(e) for e in eval_sets) * 2 + len(probe.PROBE_QUESTIONS) * (len(personas) + 1)
    with Progress(TextColumn("evaluating (greedy generation)"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("eval", total=rows_total)
        t2 = time.perf_counter()
        results = evaluate_revisions(reg, addresses, base, eval_sets, max_new_tokens=args.max_new_tokens,
                                     batch_size=args.gen_batch, on_batch=lambda n: bar.advance(task, n))
        eval_s = time.perf_counter() - t2
    decisions = [gatemod.gate(reg, a) for a in addresses]

    headers = ["persona", "habit", "adherence base", "adherence adapter", "held-out loss base → adapter",
               "probe ppl ×", "probe retention", "adapter KiB", "gate"]
    rows = []
    for p, (rev, m), d in zip(personas, results, decisions, strict=True):
        rows.append([p.name, p.habit, f"{m['base_adherence']:.0%}", f"{m['adherence']:.0%}",
                     f"{m['base_eval_loss']:.3f} → {m['eval_loss']:.3f}", f"{m['probe_ppl_ratio']:.3f}",
                     f"{m['probe_retention']:.0%}", f"{rev.size / 1024:.0f}", "live" if d.promoted else "refused"])
    title = f"persona habits: base vs rank-{args.rank} adapter on held-out prompts ({base.name})"
    show(title, headers, rows)
    good = sum(m["adherence"] >= 0.8 for _, m in results)

    # -- the gate refusing twice, a forced promotion, a rollback ----------------------------------------
    first = personas[0]
    ref = refs[first.name]
    _, blob1 = reg.load(f"{ref}#1", base_fingerprint=base.fingerprint)
    trained = from_bytes(blob1, base)
    # #2: the trained adapter with its deltas amplified x4 — the habit may survive, general language does not.
    loud = LoraAdapter(trained.spec, {n: (A, B * 4.0) for n, (A, B) in trained.weights.items()}, base.name)
    # #3: an adapter that learned nothing (standard init, B = 0: exactly the base).
    blank = LoraAdapter.create(base, spec, seed=1)
    demo = []
    for adapter, note in ((loud, "trained deltas x4"), (blank, "untrained")):
        rev = reg.commit(ref, to_bytes(adapter), Provenance(base_fingerprint=base.fingerprint, parent=1, method="demo",
                                                             hyperparams={"note": note}), creator="benchmark")
        (_, m), = evaluate_revisions(reg, [rev.address], base, [EvalSet.from_persona(first)],
                                     max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch)
        demo.append((rev, note, m, gatemod.gate(reg, rev.address)))
    blank_address = demo[-1][0].address
    forced = gatemod.promote(reg, blank_address, force=True, reason="benchmark: show a forced promotion")
    back = gatemod.rollback(reg, ref, reason="benchmark: undo the forced promotion")
    demo_headers = ["revision", "what", "adherence", "held-out loss", "probe ppl ×", "probe retention", "gate"]
    demo_rows = [["#1", "trained", f"{results[0][1]['adherence']:.0%}", f"{results[0][1]['eval_loss']:.3f}",
                  f"{results[0][1]['probe_ppl_ratio']:.3f}", f"{results[0][1]['probe_retention']:.0%}",
                  "live" if decisions[0].promoted else "refused"]]
    demo_rows += [[f"#{rev.number}", note, f"{m['adherence']:.0%}", f"{m['eval_loss']:.3f}", f"{m['probe_ppl_ratio']:.3f}",
                   f"{m['probe_retention']:.0%}", d.reason.split(": ", 1)[1]] for rev, note, m, d in demo]
    show(f"the gate on more revisions of {ref}", demo_headers, demo_rows)
    audit = list(reversed(reg.audit(ref)))
    audit_rows = [[e.id, e.action, e.alias or "-", e.from_number or "-", e.to_number or "-", e.actor, e.reason]
                  for e in audit]
    audit_headers = ["id", "action", "alias", "from", "to", "actor", "reason"]
    show(f"audit log of {ref}", audit_headers, audit_rows)
    if not args.quick:
        assert not any(d.promoted for *_, d in demo) and forced.forced and back.to_number == 1

    steps_done = args.steps
    summary = (f"{good}/{len(personas)} adapters reach ≥ 80% adherence on held-out prompts; "
               f"training {train_s:.0f} s for {steps_done} packed steps ({train_s / steps_done:.1f} s/step, "
               f"{len(personas)} personas × {args.batch} rows), evaluation {eval_s:.0f} s, base load {load_s:.0f} s, "
               f"total {time.perf_counter() - t0:.0f} s")
    console.print(summary)
    if args.quick:
        return 0
    import platform  # noqa: PLC0415

    cfg_gate = gatemod.GateConfig()

    notes = "\n".join([
        f"- {summary}.",
        f"- `uname -a`: `{' '.join(platform.uname())}`",
        f"- training: through the job queue (`lorafleet.training.jobs` + one `Worker` packing all "
        f"{len(personas)} jobs into each step), LoRA rank {args.rank}, alpha {args.alpha:g}, targets "
        f"{args.targets}, lr {args.lr:g}, {args.batch} rows per persona per step, {args.steps} steps, "
        f"{personas[0].n_train} train / {personas[0].n_eval} held-out examples per persona "
        f"(held-out prompts never appear in training; the tool persona's eval cities are unseen in training).",
        f"- adherence: greedy, at most {args.max_new_tokens} new tokens, checked by the persona's habit checker. "
        "The tool persona's eval set has 25% non-weather prompts where the right behaviour is *not* calling "
        "the tool, which the base gets right by default — so its base adherence is about 25%, not 0%.",
        f"- probe: perplexity on {len(probe.PROBE_TEXTS)} general paragraphs (ratio adapter / base) and "
        f"{len(probe.PROBE_QUESTIONS)} factual prompts "
        "(retention = share of the base's correct answers the adapter keeps).",
        f"- gate (defaults): adherence +{cfg_gate.adherence_margin:g} over the reference (the base when nothing is "
        f"live), or equal adherence and held-out loss −{cfg_gate.loss_margin:g}; probe perplexity ≤ "
        f"×{cfg_gate.max_ppl_ratio:g} of the base and retention ≥ {cfg_gate.min_probe_retention:.0%}.",
        f"- more revisions of {ref}: the trained deltas ×4 and an untrained adapter, both refused; the untrained one "
        "is then force-promoted and rolled back (audit log above).",
    ])
    write_result("persona_gate", "Persona habits and the promotion gate",
                 [("Adherence, loss, competence, size, gate", markdown_table(headers, rows)),
                  (f"The gate on more revisions of {ref}", markdown_table(demo_headers, demo_rows)),
                  (f"Audit log of {ref}", markdown_table(audit_headers, audit_rows))], notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
