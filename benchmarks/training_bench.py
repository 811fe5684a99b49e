"""Packed multi-user training vs one user at a time vs plain peft — wall time, tokens/s, RSS, final loss.

    python benchmarks/training_bench.py            # 8 users x 32 examples on SmolLM2-135M-Instruct, rank 8
    python benchmarks/training_bench.py --quick    # tiny model smoke run (writes only with --out)

Each mode runs in its own process (clean peak RSS) on the same data, with the same number of optimizer
steps per user: (a) lorafleet packed — every step carries all users' rows; (b) the same code, one user at a
time; (c) plain peft + transformers, one user at a time (a fresh `get_peft_model` per user).
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


def child(mode: str, base_name: str, users: int, examples: int, steps: int, rank: int, batch: int) -> dict:
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
    base = load_base(base_name)
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
            trainer = MultiTenantTrainer(base)
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
    return {"mode": mode, "setup_s": setup_s, "train_s": train_s, "tokens": tokens, "tokens_per_s": tokens / train_s,
            "peak_rss_mb": peak_rss_mb(), "final_loss": final}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per mode (0 = torch's default)")
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
        print(json.dumps(child(args.child, base_name, args.users, args.examples, args.steps, args.rank, args.batch)))
        return

    from _common import console, markdown_table, run_child, show, write_markdown, write_result

    results = {}
    for mode in ("packed", "sequential", "peft"):
        argv = [__file__, "--child", mode, "--users", str(args.users), "--examples", str(args.examples),
                "--steps", str(args.steps), "--rank", str(args.rank), "--batch", str(args.batch),
                "--threads", str(args.threads)]
        if args.quick:
            argv.append("--quick")
        results[mode] = json.loads(run_child(argv).strip().splitlines()[-1])
    packed = results["packed"]
    headers = ["mode", "setup s", "train s", "tokens trained", "tokens/s (train)", "speed-up of packed (train)",
               "peak RSS MB", "mean final loss", "final loss range"]
    rows = []
    for mode, label in (("packed", "(a) lorafleet packed, all users per step"),
                        ("sequential", "(b) lorafleet, one user at a time"), ("peft", "(c) peft + transformers, one user at a time")):
        r = results[mode]
        losses = r["final_loss"]
        rows.append([label, f"{r['setup_s']:.1f}", f"{r['train_s']:.1f}", f"{r['tokens']:,}", f"{r['tokens_per_s']:.0f}",
                     f"{r['train_s'] / packed['train_s']:.2f}x", f"{r['peak_rss_mb']:.0f}",
                     f"{sum(losses) / len(losses):.4f}", f"{min(losses):.3f}–{max(losses):.3f}"])
    title = (f"Multi-user training: {args.users} users x {args.examples} examples, rank {args.rank}, "
             f"{args.steps} steps/user of {args.batch} rows, {base_name}")
    show(title, headers, rows)
    mean = {m: sum(r["final_loss"]) / len(r["final_loss"]) for m, r in results.items()}
    notes = (f"Timed phases, the same on every side: imports and the base load are outside the clock; 'setup s' is "
             f"the per-user setup (adapter, tokenized data, optimizer; peft also its copy of the base and "
             f"get_peft_model); 'train s' is the optimizer steps, which the speed-up and tokens/s use. 'tokens trained' "
             f"counts the real (unpadded) tokens of every row trained on. "
             f"Targets: (a) >= 1.5x faster than (b) and (c) at equal final loss (±5%), peak RSS < 6 GB. "
             f"Measured (train s): {results['sequential']['train_s'] / packed['train_s']:.2f}x vs (b), "
             f"{results['peft']['train_s'] / packed['train_s']:.2f}x vs (c); final loss (a)/(b) = "
             f"{mean['packed'] / mean['sequential']:.3f}, (a)/(c) = {mean['packed'] / mean['peft']:.3f}; "
             f"peak RSS (a) {packed['peak_rss_mb'] / 1024:.2f} GB.")
    show("summary", ["note"], [[notes]])
    sections = [("Results", markdown_table(headers, rows))]
    if args.out:
        write_markdown(Path(args.out), title, sections, notes)
        console.print(f"wrote {args.out}")
    elif not args.quick:
        write_result("training", title, sections, notes)

if __name__ == "__main__":
    main()
