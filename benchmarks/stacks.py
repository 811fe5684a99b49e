"""Composable adapters: an organisation habit + per-user habits, learned with a stack vs per-user full adapters.

    OMP_NUM_THREADS=1 python benchmarks/stacks.py          # SmolLM2-135M-Instruct (~10-15 min on 2 busy cores)
    OMP_NUM_THREADS=1 python benchmarks/stacks.py --quick  # tiny model smoke run (nothing written)

The organisation's habit: every answer opens with the company greeting. Each user's own habit: a personal
sign-off. Everything goes through the registry, the job queue and the worker:

1. ``acme/_org/support`` is trained on the organisation's pooled examples (greeting only) and made live;
2. per user, adapters are trained on the *same* personal examples (greeting + answer + sign-off), all packed
   into the same optimizer steps: ``acme/<u>/stacked`` (created with ``--parent acme/_org/support``: trained
   on top of the frozen org adapter, smaller rank), ``acme/<u>/lite`` (the same, with half the steps: half the
   personal training tokens) and ``acme/<u>/full`` (no parent: must learn both habits);
3. both are evaluated on held-out prompts as they are served (the stacked one with its org level), each
   response checked for both habits by the persona checkers;
4. serving throughput: the same requests through the engine, as stacks (org + user, two levels per row)
   and as single full adapters.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ORG_GREETING = "Welcome to Acme!"
USERS = {"alice": "— Alice", "bob": "Cheers, Bob", "kim": "Best, Kim", "sam": "Stay curious, Sam", "tom": "Over and out, Tom"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 users, a few steps; writes nothing")
    parser.add_argument("--users", type=int, default=3, help=f"users (at most {len(USERS)})")
    parser.add_argument("--org-steps", type=int, default=20)
    parser.add_argument("--org-examples", type=int, default=32, help="the organisation's pooled examples")
    parser.add_argument("--user-steps", type=int, default=16)
    parser.add_argument("--lite-steps", type=int, default=8, help="steps of the 'lite' stacked personal level")
    parser.add_argument("--user-examples", type=int, default=16, help="personal examples per user")
    parser.add_argument("--batch", type=int, default=2, help="rows per user per step")
    parser.add_argument("--org-rank", type=int, default=4)
    parser.add_argument("--stacked-rank", type=int, default=2, help="rank of the personal level of a stack")
    parser.add_argument("--full-rank", type=int, default=4, help="rank of a per-user full adapter")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-examples", type=int, default=6, help="held-out prompts per user")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--serve-requests", type=int, default=12)
    parser.add_argument("--serve-tokens", type=int, default=16)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    args = parser.parse_args()
    if args.quick:
        args.base, args.users, args.org_steps, args.user_steps, args.max_new_tokens = "tiny", 2, 3, 3, 8
        args.lite_steps = 2
        args.eval_examples, args.serve_requests, args.serve_tokens = 3, 4, 6

    import torch
    from _common import console, markdown_table, show, write_result

    from lorafleet.adapters import LoraSpec
    from lorafleet.base import load_base
    from lorafleet.config import quiet_libraries
    from lorafleet.evaluation.generation import generate_responses
    from lorafleet.evaluation.metrics import load_for_eval
    from lorafleet.evaluation.personas import Persona
    from lorafleet.registry import Registry
    from lorafleet.serving.engine import Engine, EngineConfig, SamplingParams
    from lorafleet.training.data import dataset_from_records
    from lorafleet.training.jobs import JobQueue
    from lorafleet.training.trainer import TrainConfig
    from lorafleet.training.worker import Worker, WorkerConfig

    quiet_libraries()
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    users = list(USERS)[: args.users]
    tmp = Path(tempfile.mkdtemp(prefix="stacks-bench-"))
    reg = Registry(f"sqlite:///{tmp / 'registry.db'}", str(tmp / "blobs"))
    with console.status(f"loading {args.base}…"):
        base = load_base(args.base)
    console.print(f"{base.name} loaded; torch threads {torch.get_num_threads()}")

    # -- data: the org habit (a greeting persona) and each user's (a sign-off persona), composed ---------------
    org = Persona("acme-org", "greeting", {"text": ORG_GREETING}, seed=1, n_train=args.org_examples,
                  n_eval=args.eval_examples)
    signoffs = {u: Persona(u, "signoff", {"text": USERS[u]}, seed=10 + i, n_train=args.user_examples,
                           n_eval=args.eval_examples) for i, u in enumerate(users)}

    def both(record: dict, user: str) -> dict:
        """A user's example: the org greeting, the answer, the user's sign-off (their real traffic shows both)."""
        msgs = [dict(m) for m in record["messages"]]
        msgs[-1]["content"] = f"{ORG_GREETING} {msgs[-1]['content']}"
        return {"messages": msgs}

    user_train = {u: [both(r, u) for r in signoffs[u].data().train] for u in users}
    user_eval = {u: signoffs[u].data().eval for u in users}

    def tokens(records, max_len=128) -> int:
        from lorafleet.training.data import tokenize_sft  # noqa: PLC0415

        return sum(len(tokenize_sft(base.tokenizer, r, max_len).input_ids) for r in records)

    queue = JobQueue(reg)

    def train(jobs: list[tuple[str, list[dict], int, int]], label: str) -> float:
        """Submit ``(ref, records, rank, steps)`` jobs and run one worker packing them; returns seconds."""
        for ref, records, rank, steps in jobs:
            queue.submit(ref, dataset_from_records(records, "sft"),
                         LoraSpec(rank=rank, alpha=4.0 * rank, target_modules="all"),
                         TrainConfig(steps=steps, lr=args.lr, batch_size=args.batch if "_org" not in ref else 4,
                                     max_len=128, seed=0), creator="benchmark", warm_start="none")
        t0 = time.perf_counter()
        last = [0.0]

        def on_progress(job_id, step, total, loss):
            now = time.perf_counter()
            if now - last[0] > 15 or step == total:
                last[0] = now
                console.print(f"  {label}: job {job_id} step {step}/{total} loss {loss:.3f} ({now - t0:.0f} s)")

        worker = Worker(reg, base, WorkerConfig(max_jobs=len(jobs), checkpoint_every=10_000, lease_seconds=3600.0),
                        on_progress=on_progress)
        done = worker.run(until_idle=True)
        bad = [(j.ref, j.error) for j in done if j.state != "succeeded"]
        if bad:
            raise SystemExit(f"training failed: {bad}")
        return time.perf_counter() - t0

    # 1. the organisation's adapter, once for everyone
    reg.create_adapter("acme/_org/support", creator="benchmark")
    org_train = org.data().train
    console.rule("1. the organisation adapter")
    org_s = train([("acme/_org/support", org_train, args.org_rank, args.org_steps)], "org")
    org_rev = reg.resolve("acme/_org/support@candidate")
    reg.set_alias("acme/_org/support", "live", org_rev.number, actor="benchmark", reason="benchmark org level")

    # 2. per user: a stacked personal level and a full adapter, trained in the same packed steps
    console.rule("2. per-user adapters: stacked (on the frozen org level) and full, packed together")
    jobs = []
    for u in users:
        reg.create_adapter(f"acme/{u}/stacked", parent="acme/_org/support", creator="benchmark")
        reg.create_adapter(f"acme/{u}/lite", parent="acme/_org/support", creator="benchmark")
        reg.create_adapter(f"acme/{u}/full", creator="benchmark")
        jobs += [(f"acme/{u}/stacked", user_train[u], args.stacked_rank, args.user_steps),
                 (f"acme/{u}/lite", user_train[u], args.stacked_rank, args.lite_steps),
                 (f"acme/{u}/full", user_train[u], args.full_rank, args.user_steps)]
    users_s = train(jobs, "users")

    # 3. held-out adherence of both habits, each adapter as it is served
    console.rule("3. held-out adherence (greedy), both habits checked on every response")
    kinds = ("stacked", "lite", "full")
    steps_of = {"stacked": args.user_steps, "lite": args.lite_steps, "full": args.user_steps}
    label = {"stacked": "stacked", "lite": "stacked, ½ steps", "full": "full", "base": "base (no adapter)"}
    rows_adapters, rows_prompts, rows_key = [], [], []
    loaded = {}
    for u in users:
        prompts = [r["messages"][:-1] for r in user_eval[u]]
        for kind in kinds:
            rev, adapter, stack = load_for_eval(reg, f"acme/{u}/{kind}@candidate", base)
            loaded[(u, kind)] = (rev, stack)
            rows_adapters += [adapter] * len(prompts)
            rows_prompts += prompts
            rows_key += [(u, kind, m[-1]["content"]) for m in prompts]
        rows_adapters += [None] * len(prompts)
        rows_prompts += prompts
        rows_key += [(u, "base", m[-1]["content"]) for m in prompts]
    t0 = time.perf_counter()
    done_rows = [0]

    def on_batch(n):
        done_rows[0] += n
        console.print(f"  generated {done_rows[0]}/{len(rows_prompts)} responses ({time.perf_counter() - t0:.0f} s)")

    responses = generate_responses(base, rows_prompts, rows_adapters, max_new_tokens=args.max_new_tokens,
                                   batch_size=24, on_batch=on_batch)
    eval_s = time.perf_counter() - t0
    greet = org.habit_obj
    score: dict[tuple[str, str], list[tuple[bool, bool]]] = {}
    samples = {}
    for (u, kind, prompt), text in zip(rows_key, responses, strict=True):
        score.setdefault((u, kind), []).append((greet.check(text, prompt), signoffs[u].habit_obj.check(text, prompt)))
        samples.setdefault((u, kind), text)

    def rate(u, kind, i):
        marks = score[(u, kind)]
        return sum(m[i] for m in marks) / len(marks)

    org_bytes = reg.resolve("acme/_org/support").size
    org_tokens = tokens(org_train) / len(org_train) * args.org_steps * 4  # rows seen in the org's steps
    per_example = {u: tokens(user_train[u]) / len(user_train[u]) for u in users}
    headers = ["user", "approach", "org habit (greeting)", "own habit (sign-off)", "both", "rank",
               "bytes / user", "training tokens / user"]
    rows = []
    agg = {k: [0.0, 0.0, 0.0] for k in (*kinds, "base")}
    for u in users:
        for kind in (*kinds, "base"):
            g, s = rate(u, kind, 0), rate(u, kind, 1)
            b = sum(m[0] and m[1] for m in score[(u, kind)]) / len(score[(u, kind)])
            for i, v in enumerate((g, s, b)):
                agg[kind][i] += v / len(users)
            if kind == "base":
                rows.append([u, label[kind], f"{g:.0%}", f"{s:.0%}", f"{b:.0%}", "-", "-", "-"])
                continue
            rev, _ = loaded[(u, kind)]
            stacked = kind != "full"
            user_tokens = per_example[u] * steps_of[kind] * args.batch
            per_user_bytes = rev.size + (org_bytes / len(users) if stacked else 0)
            tok = user_tokens + (org_tokens / len(users) if stacked else 0)
            note = f" + org {org_bytes / 1024:.0f} KiB / {len(users)}" if stacked else ""
            tnote = f" + org {org_tokens:,.0f} / {len(users)}" if stacked else ""
            rank = args.stacked_rank if stacked else args.full_rank
            rows.append([u, label[kind], f"{g:.0%}", f"{s:.0%}", f"{b:.0%}", rank,
                         f"{rev.size / 1024:.0f} KiB{note} = {per_user_bytes / 1024:.0f} KiB",
                         f"{user_tokens:,.0f}{tnote} = {tok:,.0f}"])
    title = f"org + personal habits on held-out prompts ({base.name}, {len(users)} users × {args.eval_examples})"
    show(title, headers, rows)
    summary_rows = [[label[kind], f"{agg[kind][0]:.0%}", f"{agg[kind][1]:.0%}", f"{agg[kind][2]:.0%}"]
                    for kind in (*kinds, "base")]
    show("mean over users", ["approach", "org habit", "own habit", "both"], summary_rows)

    # 4. serving throughput: stacks (2 levels per row) vs single adapters, same requests
    console.rule("4. serving throughput: stacks vs single adapters")
    engine = Engine(base, reg.read_blob, EngineConfig(max_batch=args.serve_requests, max_active=2 * len(users) + 1,
                                                      max_cached=4 * len(users) + 2, max_rank=max(args.org_rank,
                                                                                             args.full_rank)))
    prompts = [r["messages"][:-1] for u in users for r in user_eval[u]][: args.serve_requests]
    while len(prompts) < args.serve_requests:
        prompts += prompts[: args.serve_requests - len(prompts)]
    stacked_req = [tuple(lvl["digest"] for lvl in loaded[(users[i % len(users)], "stacked")][1])
                   for i in range(args.serve_requests)]
    single_req = [loaded[(users[i % len(users)], "full")][0].digest for i in range(args.serve_requests)]
    sampling = SamplingParams(max_tokens=args.serve_tokens, ignore_eos=True)
    serve = {}
    for label, reqs in (("single adapters", single_req), ("stacks (org + user)", stacked_req)) * 2:
        engine.generate(prompts[:2], reqs[:2], SamplingParams(max_tokens=2))  # adapters resident, warm
        t0 = time.perf_counter()
        results = engine.generate(prompts, reqs, sampling)
        dt = time.perf_counter() - t0
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        toks = sum(r.completion_tokens for r in results)
        serve[label] = max(serve.get(label, 0.0), toks / dt)  # best of two rounds (a shared, noisy machine)
    snap = engine.residency_snapshot()
    engine.close()
    serve_headers = ["rows", "tokens / s (best of 2)", "vs single adapters"]
    serve_rows = [[label, f"{v:.1f}", f"{v / serve['single adapters']:.2f}×"] for label, v in serve.items()]
    show(f"engine throughput: {args.serve_requests} requests × {args.serve_tokens} tokens, one batch",
         serve_headers, serve_rows)
    distinct = len({lvl for s in stacked_req for lvl in s})
    total_s = time.perf_counter() - t_start
    summary = (f"{len(users)} users; org adapter trained in {org_s:.0f} s ({args.org_steps} steps), the "
               f"{len(kinds) * len(users)} personal adapters packed into {args.user_steps} steps in {users_s:.0f} s; "
               f"evaluation {eval_s:.0f} s; total {total_s:.0f} s")
    console.print(summary)
    if args.quick:
        return 0
    import platform  # noqa: PLC0415

    sample_rows = [[f"acme/{users[0]}/{kind}" if kind != "base" else "base",
                    samples[(users[0], kind)][:160].replace("\n", " ").replace("|", "/")]
                   for kind in (*kinds, "base")]
    notes = "\n".join([
        f"- {summary}.",
        f"- `uname -a`: `{' '.join(platform.uname())}`; `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}`; "
        f"1-minute load average {load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end (the 2 cores "
        "are shared with other jobs: absolute times and tokens/s are slow and noisy, the ratios are measured side "
        "by side in one process).",
        f"- org level `acme/_org/support`: rank {args.org_rank}, all projections, {args.org_examples} pooled "
        f"greeting examples, {args.org_steps} steps × 4 rows; made live, then frozen under every stacked user.",
        f"- per user: the same {args.user_examples} personal examples (greeting + answer + sign-off) for both "
        f"approaches, {args.user_steps} steps × {args.batch} rows ({args.lite_steps} steps for `lite`), lr "
        f"{args.lr:g}, alpha = 4 × rank; stacked personal level rank {args.stacked_rank}, full adapter rank "
        f"{args.full_rank}. Every kind of job ran in the same packed steps of one worker (the stacked rows routed "
        "through two levels, the org level frozen and shared by all of them).",
        f"- adherence: {args.eval_examples} held-out prompts per user (never in training), greedy, at most "
        f"{args.max_new_tokens} new tokens; the greeting and the sign-off checked separately by the persona "
        "checkers on the same response; a stacked adapter is evaluated as served (org live + its level).",
        "- bytes / user: the personal revision, plus the org revision shared by the users (amortized). Training "
        "tokens / user: the personal job's tokens, plus the org job's tokens amortized over the users.",
        f"- serving: {args.serve_requests} requests in one batch, {args.serve_tokens} tokens each (ignore_eos), "
        f"greedy; stacks are 2 levels per row over {distinct} distinct adapters ({len(users)} personal + the org, "
        f"one slot each), single adapters are the {len(users)} full ones. Residency after the run: "
        f"{len(snap['ram'])} adapters in RAM, each once.",
    ])
    write_result("stacks", "Composable adapters: organisation + personal habits (stacks vs full adapters)",
                 [("Adherence, size and training tokens per user", markdown_table(headers, rows)),
                  ("Mean over users", markdown_table(["approach", "org habit", "own habit", "both"], summary_rows)),
                  ("Serving throughput", markdown_table(serve_headers, serve_rows)),
                  ("One held-out answer each", markdown_table(["adapter", "response"], sample_rows))],
                 notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
