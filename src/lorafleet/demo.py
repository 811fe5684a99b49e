"""``make demo``: load the shared base, teach one personal adapter a habit, generate with and without it.

(The full fleet tour — many users, jobs, the gate, serving — grows here as those parts land.)
"""

from __future__ import annotations

import time

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorafleet.cli_common import console

TRAIN_QA = [
    ("What is the capital of France?", "Paris."),
    ("Name a fruit.", "An apple."),
    ("How many legs does a cat have?", "Four."),
    ("What color is the sky on a clear day?", "Blue."),
    ("Give me one tip for sleeping well.", "Keep a regular bedtime."),
    ("What is 2 + 2?", "Four."),
    ("Who wrote Hamlet?", "William Shakespeare."),
    ("Suggest a hobby.", "Try sailing."),
]
HELD_OUT = ["What is the largest planet?", "Name a vegetable.", "What do bees make?"]
SIGN_OFF = "— Ahab"


def _records():
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Arr! {a} {SIGN_OFF}"}]}
            for q, a in TRAIN_QA]


def run_demo(*, quick: bool = False, base: str | None = None) -> dict:
    from lorafleet.adapters import LoraAdapter, LoraSpec  # noqa: PLC0415
    from lorafleet.base import load_base  # noqa: PLC0415
    from lorafleet.serving.hf_generate import generate  # noqa: PLC0415
    from lorafleet.training.data import dataset_from_records  # noqa: PLC0415
    from lorafleet.training.trainer import MultiTenantTrainer, TrainConfig  # noqa: PLC0415

    start = time.perf_counter()
    with console.status("loading the shared base…"):
        b = load_base("tiny" if quick else base)
    info = b.info()
    console.print(f"[bold]base[/] {info['name']}: {info['parameters']:,} parameters, {info['layers']} layers, "
                  f"hidden {info['hidden_size']}, fingerprint {info['fingerprint'][:16]}…, loaded in {info['load_seconds']:.1f}s")

    spec = LoraSpec(rank=8, alpha=16, target_modules="all")
    adapter = LoraAdapter.create(b, spec, seed=0)
    s = adapter.summary(b)
    console.print(f"[bold]personal adapter[/] for ahab: rank {spec.rank} on {s['modules']} projections, "
                  f"{s['bytes'] / 1024:.0f} KiB = {s['percent_of_base']:.2f}% of the base")

    steps = 4 if quick else 24
    trainer = MultiTenantTrainer(b)
    trainer.add("ahab", adapter, dataset_from_records(_records(), "sft"), TrainConfig(steps=steps, lr=2e-3, batch_size=4))
    with Progress(TextColumn("training ahab's adapter"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"))
        while trainer.active():
            loss = trainer.step()["ahab"]
            bar.update(task, advance=1, loss=loss)

    prompts = HELD_OUT[:1] if quick else HELD_OUT
    n = len(prompts)
    max_tokens = 8 if quick else 40
    with console.status("generating (one batch: base rows and adapter rows together)…"):
        outs = generate(b, prompts * 2, [None] * n + [adapter] * n, max_new_tokens=max_tokens)
    table = Table(title="held-out prompts: the same base, without and with the personal adapter")
    table.add_column("prompt")
    table.add_column("base")
    table.add_column("ahab's adapter")
    for i, p in enumerate(prompts):
        table.add_row(p, outs[i], outs[n + i])
    console.print(table)
    elapsed = time.perf_counter() - start
    console.print(f"done in {elapsed:.1f}s")
    return {"base": outs[:n], "adapter": outs[n:], "seconds": elapsed}
