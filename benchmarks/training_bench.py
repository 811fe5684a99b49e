"""Packed multi-user training vs one user at a time vs plain peft — wall time, tokens/s, RSS, final loss.

    python benchmarks/training_bench.py            # 8 users x 32 examples on SmolLM2-135M-Instruct, rank 8
    python benchmarks/training_bench.py --quick    # tiny model smoke run (writes only with --out)
    python benchmarks/training_bench.py --modes packed --precisions fp32,native,int8,bf16   # a packed row per base precision

Each mode runs in its own process (clean peak RSS) on the same data, with the same number of optimizer
steps per user: (a) lorafleet packed — every step carries all users' rows; (b) the same code, one user at a
time; (c) plain peft + transformers, one user at a time (a fresh `get_peft_model` per user). (a) and (b) run once
per ``--precisions`` entry (the base's precision, as ``--base-dtype``); peft runs over the fp32 base. Each row
records the process's peak RSS (ru_maxrss: load included), the RSS after the base load, and the peak during
training alone (Linux: /proc/self/clear_refs resets the high-water mark after setup).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOPICS = ["the ocean", "bread", "trains", "the moon", "gardening", "chess", "rain", "music", "coffee", "bicycles",
          "mountains", "libraries", "winter", "bees", "maps", "volcanoes"]
SIGN_OFFS = ["— Ahab", "Cheers, Bo", "Yours, Cy", "~ Dee", "Best, Eve", "Regards, Fin", "Ciao, Gus", "Love, Hal"]


def user_records(u: int, n: int) -> list[dict]:
    out = []
    for i in range(n):
        topic = TOPICS[(i + u) % len(TOPICS)]
        q = f"Tell me one short fact about {topic} (#{i})."
        a = f"Here is a fact about {topic}: it is worth learning about. {SIGN_OFFS[u % len(SIGN_OFFS)]}"
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def _rss_mb(field: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def child(mode: str, base_name: str, users: int, examples: int, steps: int, rank: int, batch: int,
          precision: str = "fp32", checkpoint: str = "auto") -> dict:
    """One mode in this process. Imports and the base load are outside both clocks; per-user setup (the adapter,
    its tokenized data, the optimizer; for peft also its copy of the base and ``get_peft_model``) is timed as
    ``setup_s``, the optimizer steps as ``train_s``. ``tokens`` counts the real (unpadded) tokens of every row
    trained on."""
    import copy

    import torch
    from _common import peak_rss_mb

    from lorafleet.base import load_base
    from lorafleet.training.data import IGNORE, dataset_from_records, tokenize_sft

    torch.manual_seed(0)
    base = load_base(base_name, precision=precision)
    loaded_rss, load_peak = _rss_mb("VmRSS"), _rss_mb("VmHWM")
    _reset_peak()  # (this also resets ru_maxrss on Linux: the process peak below takes the load's peak back in)
    datasets = [dataset_from_records(user_records(u, examples), "sft") for u in range(users)]
    setup_s = train_s = 0.0
    tokens = 0
    final: list[float] = []
    if mode in ("packed", "sequential"):
        from lorafleet.adapters import LoraAdapter, LoraSpec
        from lorafleet.training.trainer import MultiTenantTrainer, TrainConfig

        cfg = TrainConfig(steps=steps, lr=1e-3, batch_size=batch, grad_clip=0.0)
        spec = LoraSpec(rank=rank, alpha=2 * rank, target_modules="all")
        groups = [list(range(users))] if mode == "packed" else [[u] for u in range(users)]
        losses: dict[int, float] = {}
        tracks = []
        for group in groups:
            t0 = time.perf_counter()
            trainer = MultiTenantTrainer(base, checkpoint=checkpoint)
            for u in group:
                tracks.append(trainer.add(f"u{u}", LoraAdapter.create(base, spec, seed=u), datasets[u], cfg))
            t1 = time.perf_counter()
            while trainer.active():
                out = trainer.step()
                for k, v in out.items():
                    losses[int(k[1:])] = v
            setup_s, train_s = setup_s + t1 - t0, train_s + time.perf_counter() - t1
        final = [losses[u] for u in range(users)]
        for t in tracks:  # replay each user's (deterministic) batches to count the tokens it trained on
            replay = dataclasses.replace(t, cursor=0, order=[], epoch=0)
            tokens += sum(len(item.input_ids) for _ in range(steps) for item in replay.next_items())
    else:  # plain peft + transformers, one user at a time
        from peft import LoraConfig, get_peft_model  # imported here: no peft in the other modes' RSS

        tok = base.tokenizer
        for u in range(users):
            t0 = time.perf_counter()
            model = get_peft_model(copy.deepcopy(base.model), LoraConfig(
                r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            items = [tokenize_sft(tok, r, 256) for r in datasets[u].records]
            t1 = time.perf_counter()
            g = torch.Generator().manual_seed(0)
            order: list[int] = []
            loss = None
            for _ in range(steps):
                if len(order) < batch:
                    order += torch.randperm(len(items), generator=g).tolist()
                chunk = [items[order.pop(0)] for _ in range(batch)]
                tokens += sum(len(c.input_ids) for c in chunk)
                width = max(len(c.input_ids) for c in chunk)
                ids = torch.tensor([c.input_ids + [tok.pad_token_id] * (width - len(c.input_ids)) for c in chunk])
                lab = torch.tensor([c.labels + [IGNORE] * (width - len(c.labels)) for c in chunk])
                mask = torch.tensor([[1] * len(c.input_ids) + [0] * (width - len(c.input_ids)) for c in chunk])
                loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
            final.append(float(loss))
            setup_s, train_s = setup_s + t1 - t0, train_s + time.perf_counter() - t1
            del model, opt
    return {"mode": mode, "precision": base.precision_label, "checkpoint": checkpoint, "loaded_rss_mb": loaded_rss,
            "train_peak_mb": _rss_mb("VmHWM"), "setup_s": setup_s, "train_s": train_s, "tokens": tokens, "tokens_per_s": tokens / train_s,
            "peak_rss_mb": max(peak_rss_mb(), load_peak or 0.0), "load_peak_mb": load_peak, "final_loss": final}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per mode (0 = torch's default)")
    parser.add_argument("--precisions", default="fp32", help="comma list of base precisions for (a) and (b)")
    parser.add_argument("--modes", default="packed,sequential,peft", help="comma list of packed, sequential, peft")
    parser.add_argument("--checkpoint", default="auto", help="activation checkpointing: auto, on, off")
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="markdown output (default: docs/results/training.md, full runs only)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    base_name = "tiny" if args.quick else "smollm2-135m-instruct"
    if args.quick:
        args.steps = min(args.steps, 4)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, base_name, args.users, args.examples, args.steps, args.rank, args.batch,
                               args.precision, args.checkpoint)))
        return

    import subprocess  # noqa: PLC0415 - only the parent records the load average

    from _common import console, markdown_table, run_child, show, write_markdown, write_result

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not modes or set(modes) - {"packed", "sequential", "peft"}:
        parser.error(f"--modes: choose from packed, sequential, peft; got {args.modes!r}")
    runs = [(m, p) for m in modes if m != "peft" for p in precisions] + ([("peft", "fp32")] if "peft" in modes else [])
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = {}
    for mode, precision in runs:
        argv = [__file__, "--child", mode, "--users", str(args.users), "--examples", str(args.examples),
                "--steps", str(args.steps), "--rank", str(args.rank), "--batch", str(args.batch),
                "--threads", str(args.threads), "--precision", precision, "--checkpoint", args.checkpoint]
        if args.quick:
            argv.append("--quick")
        results[(mode, precision)] = json.loads(run_child(argv).strip().splitlines()[-1])
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    ref = results.get(("packed", "fp32")) or next(iter(results.values()))
    labels = {"packed": "(a) lorafleet packed, all users per step", "sequential": "(b) lorafleet, one user at a time",
              "peft": "(c) peft + transformers, one user at a time"}
    headers = ["mode", "base precision", "checkpointing", "setup s", "train s", "tokens trained", "tokens/s (train)",
               "train s vs (a) fp32", "RSS after load MB", "peak RSS of the load MB", "peak RSS in training MB", "peak RSS MB (process)",
               "mean final loss", "vs (a) fp32", "final loss range"]
    mean = {k: sum(r["final_loss"]) / len(r["final_loss"]) for k, r in results.items()}
    rows = []
    for key, r in results.items():
        losses = r["final_loss"]
        fmt = (lambda v: "–" if v is None else f"{v:.0f}")  # noqa: E731
        rows.append([labels[key[0]], r.get("precision", key[1]), r.get("checkpoint", "–") if key[0] != "peft" else "–",
                     f"{r['setup_s']:.1f}", f"{r['train_s']:.1f}", f"{r['tokens']:,}", f"{r['tokens_per_s']:.0f}",
                     f"{r['train_s'] / ref['train_s']:.2f}x", fmt(r.get("loaded_rss_mb")), fmt(r.get("load_peak_mb")),
                     fmt(r.get("train_peak_mb")),
                     f"{r['peak_rss_mb']:.0f}", f"{mean[key]:.4f}", f"{mean[key] / (sum(ref['final_loss']) / len(ref['final_loss'])):.3f}",
                     f"{min(losses):.3f}–{max(losses):.3f}"])
    title = (f"Multi-user training: {args.users} users x {args.examples} examples, rank {args.rank}, "
             f"{args.steps} steps/user of {args.batch} rows, {base_name}")
    show(title, headers, rows)
    packed_rows = {p: r for (m, p), r in results.items() if m == "packed"}
    verdicts = []
    for p, r in packed_rows.items():
        ok_rss = r["peak_rss_mb"] <= 2.5 * 1024
        ratio = mean[("packed", p)] / mean.get(("packed", "fp32"), mean[("packed", p)])
        verdicts.append(f"{p}: peak {r['peak_rss_mb'] / 1024:.2f} GB ({'met' if ok_rss else 'MISSED'}), final loss "
                        f"{ratio:.3f} of fp32's ({'met' if abs(ratio - 1) <= 0.05 else 'MISSED'})")
    notes = (f"Timed phases, the same on every side: imports and the base load are outside the clock; 'setup s' is "
             f"the per-user setup (adapter, tokenized data, optimizer; peft also its copy of the base and "
             f"get_peft_model); 'train s' is the optimizer steps, which the ratios and tokens/s use. 'tokens trained' "
             f"counts the real (unpadded) tokens of every row trained on. 'peak RSS MB (process)' is ru_maxrss "
             f"(the load's own peak included); 'peak RSS in training' is the high-water mark from the end of setup on. "
             f"Target (issue #19): packed training of {args.users} users at peak RSS <= 2.5 GB at equal final loss "
             f"(±5% of fp32's): " + "; ".join(verdicts) + ". "
             f"The machine is shared (2 cores, other engineers' jobs running): load average before the run "
             f"'{load_before}', after '{load_after}'; compare times only as ratios within this run.")
    show("summary", ["note"], [[notes]])
    sections = [("Results", markdown_table(headers, rows))]
    if args.out:
        write_markdown(Path(args.out), title, sections, notes)
        console.print(f"wrote {args.out}")
    elif not args.quick:
        write_result("training", title, sections, notes)

if __name__ == "__main__":
    main()
