"""A user adds a second habit through feedback, over two scheduled update cycles, and keeps the first.

    python benchmarks/continual.py            # SmolLM2-135M-Instruct (~15 min on 2 shared cores)
    python benchmarks/continual.py --quick    # tiny model smoke run (writes nothing)

Setup: the user's adapter learned habit A (persona ``ahab``: ends with '— Ahab') the usual way — a training job,
evaluation, the gate — and is live. Then, per cycle: the user chats through the OpenAI API (capture on); for each
answer they send a preferred rewrite through ``POST /v1/feedback`` that adds habit B (persona ``greta``: opens with
'Greetings, traveller!') and keeps the sign-off; the worker's scheduler sees >= N new examples, trains a revision
warm-started from live on them (+ a replay sample of earlier feedback), evaluates it on B's held-out prompts with
the competence probe, and on A's held-out prompts (the drift guard) side by side with live, and the gate decides.
After each cycle the table shows adherence of both habits on held-out prompts (the personas' eval splits, never
trained on) for the candidate and the revision live before it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REF = "bench/robin/assistant"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps; writes nothing")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--first", default="ahab", help="persona of the habit the user already has")
    parser.add_argument("--second", default="greta", help="persona of the habit added through feedback")
    parser.add_argument("--per-cycle", type=int, default=12, help="conversations (and rewrites) per cycle")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="training steps of habit A")
    parser.add_argument("--update-steps", type=int, default=12, help="training steps per update cycle")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--update-lr", type=float, default=None, help="learning rate of the updates (default --lr)")
    parser.add_argument("--out", default="continual", help="result name: docs/results/<out>.md")
    parser.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts per habit")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.quick:
        args.base, args.steps, args.update_steps, args.per_cycle, args.max_new_tokens = "tiny", 3, 3, 4, 8
        args.eval_prompts = 4

    import torch
    from _common import console, markdown_table, show, write_result
    from fastapi.testclient import TestClient

    from lorafleet.adapters import LoraSpec
    from lorafleet.api.app import create_app
    from lorafleet.api.service import Service
    from lorafleet.base import load_base
    from lorafleet.config import quiet_libraries
    from lorafleet.continual.schedule import Scheduler
    from lorafleet.evaluation import gate as gatemod
    from lorafleet.evaluation.engine_backend import EngineBackend
    from lorafleet.evaluation.metrics import EvalSet, evaluate_revisions
    from lorafleet.evaluation.personas import get_persona
    from lorafleet.registry import Registry
    from lorafleet.serving.params import EngineConfig
    from lorafleet.training.jobs import JobQueue
    from lorafleet.training.trainer import TrainConfig
    from lorafleet.training.worker import Worker

    torch.set_num_threads(1)
    quiet_libraries()
    t_start = time.perf_counter()
    first, second = get_persona(args.first), get_persona(args.second)
    home = Path(tempfile.mkdtemp(prefix="lorafleet-continual-"))
    reg = Registry(f"sqlite:///{home / 'registry.db'}", str(home / "blobs"))
    base = load_base(args.base)
    console.print(f"base {base.name} loaded; registry in {home}")
    # evaluation generates through the same engine that serves the chats
    backend = EngineBackend(base, reg.read_blob, EngineConfig(max_batch=16, max_active=8, max_cached=16, max_rank=16))
    engine = backend.engine
    service = Service(reg, base, engine)
    memory = service.memory
    _, key = service.keys.create(tenant="bench")
    limit = args.eval_prompts

    def limited(persona) -> EvalSet:
        es = EvalSet.from_persona(persona)
        return EvalSet(es.name, es.records[:limit], persona=persona)

    # ---- habit A, the usual way: a training job, evaluation, the gate
    reg.create_adapter(REF, creator="bench")
    queue = JobQueue(reg)
    job = queue.submit(REF, first.data().train_dataset(), LoraSpec(rank=4, alpha=8.0, target_modules="all"),
                       TrainConfig(steps=args.steps, lr=args.lr, batch_size=2, max_len=160), creator="bench",
                       warm_start="none")
    t0 = time.perf_counter()
    Worker(reg, base).run(until_idle=True, only={job.id})
    rev1 = reg.resolve(f"{REF}#{queue.get(job.id).result_number}")
    console.print(f"habit A ({first.describe()}) trained in {time.perf_counter() - t0:.0f}s: {rev1.address}")
    evaluate_revisions(reg, [rev1.address], base, [limited(first)], max_new_tokens=args.max_new_tokens,
                       backend=backend)
    d1 = gatemod.gate(reg, rev1.address, actor="bench")
    console.print(f"gate: {d1.reason}")
    if not d1.promoted:
        d1 = gatemod.promote(reg, rev1.address, force=True, reason="benchmark setup: habit A must be live",
                             actor="bench")
    m1 = reg.resolve(rev1.address).provenance.metrics
    rows = [["setup", rev1.address, "-", f"{m1['base_adherence']:.0%}", f"{m1['adherence']:.0%}", "-", "-",
             "forced" if d1.forced else "promoted"]]

    # ---- the schedule: capture on, retrain at N new examples, B's persona checks the new habit
    update_lr = args.update_lr or args.lr
    policy = {"min_examples": args.per_cycle, "steps": args.update_steps, "lr": update_lr, "batch_size": 2,
              "max_len": 160, "holdout": 0.0, "replay": 1.0, "eval_persona": second.to_dict(),
              "eval_limit": limit, "max_new_tokens": args.max_new_tokens, "probe": not args.quick}
    memory.configure(REF, capture=True, enabled=True, policy=policy)
    scheduler = Scheduler(reg, base, memory=memory, backend=backend)
    prompts = second.data().train_prompts  # the user's conversations: never the held-out eval prompts
    cycle_rows, samples = [], []
    with TestClient(create_app(service)) as client:
        for cycle in range(1, args.cycles + 1):
            batch = prompts[(cycle - 1) * args.per_cycle: cycle * args.per_cycle]
            t0 = time.perf_counter()

            def chat(prompt: str) -> dict:
                r = client.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, json={
                    "model": REF, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": args.max_new_tokens, "temperature": 0})
                r.raise_for_status()
                return r.json()

            with ThreadPoolExecutor(8) as pool:  # concurrent users: the engine batches them
                served = list(pool.map(chat, batch))
            sign = first.params["text"]
            greeting = second.params["text"]
            for s in served:  # the user's rewrite: their greeting first, their sign-off kept at the end
                text = s["choices"][0]["message"]["content"].strip()
                text = text if text.endswith(sign) else f"{text} {sign}"
                rewrite = text if text.startswith(greeting) else f"{greeting} {text}"
                r = client.post("/v1/feedback", headers={"authorization": f"Bearer {key}"},
                                json={"response_id": s["id"], "rewrite": rewrite})
                r.raise_for_status()
            samples.append((cycle, batch[0], served[0]["choices"][0]["message"]["content"]))
            console.print(f"cycle {cycle}: {len(served)} conversations served and captured, {len(served)} rewrites "
                          f"sent ({time.perf_counter() - t0:.0f}s); the worker runs the schedule…")
            t0 = time.perf_counter()
            Worker(reg, base, hooks=[scheduler.tick]).run(until_idle=True)
            last = memory.settings(REF).last_result
            cand = reg.resolve(last["revision"])
            m = cand.provenance.metrics
            drift = m["drift"][0] if m["drift"] else {}
            ref_m = m["reference"]
            console.print(f"cycle {cycle}: {last['state']} {cand.address} in {time.perf_counter() - t0:.0f}s — "
                          f"{last['reason']}")
            window = cand.provenance.hyperparams["window"]
            cycle_rows.append([f"cycle {cycle}", cand.address, f"{ref_m['name']}",
                               f"{drift.get('ref_adherence', float('nan')):.0%} → {drift.get('adherence', 0):.0%}",
                               f"{ref_m['adherence']:.0%} → {m['adherence']:.0%}",
                               f"{window['new_examples']} new + {window['replay_examples']} replay "
                               f"(feedback {window['feedback_ids'][0]}–{window['feedback_ids'][1]})",
                               f"ppl x{m['probe_ppl_ratio']:.2f}, kept {m['probe_retention']:.0%}"
                               if m.get("probe_ppl_ratio") else "off",
                               last["state"]])
            samples.append((cycle, "(held-out) " + m["samples"][0]["prompt"], m["samples"][0]["response"]))
    backend.close()

    headers = ["step", "revision", "vs", f"habit A ({first.name}) adherence", f"habit B ({second.name}) adherence",
               "trained on", "competence probe", "gate"]
    table_rows = [[rows[0][0], rows[0][1], "base", f"{rows[0][3]} → {rows[0][4]}", "-", "persona train split",
                   "", rows[0][7]]] + cycle_rows
    show("continual learning: a second habit through feedback, the first kept", headers, table_rows)
    seconds = time.perf_counter() - t_start
    console.print(f"total {seconds:.0f}s")
    if args.quick:
        return 0
    audit = [[e.id, e.action, e.alias or "", f"{e.from_number}→{e.to_number}", e.actor, e.reason[:150]]
             for e in reversed(reg.audit(REF, 20))]
    sample_text = "\n".join(f"- cycle {c}: “{p}” → “{r[:160]}”" for c, p, r in samples)
    write_result(args.out, "Continual learning: a second habit through feedback, the first one kept", [
        ("Result", markdown_table(headers, table_rows)),
        ("Audit log of the adapter", markdown_table(["id", "action", "alias", "move", "actor", "reason"], audit)),
        ("Samples", sample_text),
    ], notes=(
        f"Adherence arrows read *reference → candidate*, measured in the same run on {limit} held-out prompts per "
        f"habit (the personas' eval splits; the conversations used {second.name}'s train prompts). Habit A's column "
        "is the gate's drift guard: the candidate and the revision live before it on A's eval set, side by side. "
        f"Each cycle: {args.per_cycle} conversations through the OpenAI API with capture on, one rewrite each through "
        f"POST /v1/feedback, then the worker's scheduler: {args.update_steps} steps warm-started from live, "
        f"lr {update_lr}, replay 1.0 (cycle 2 replays cycle 1's feedback). Total wall time {seconds:.0f}s with "
        "OMP_NUM_THREADS=1."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
