"""CLI: ``lorafleet train``, ``lorafleet worker``, ``lorafleet jobs ls|show|cancel``."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorafleet.cli.common import BaseDtypeOpt, console, handle_errors, print_json, settings, use_base_dtype
from lorafleet.config import quiet_libraries
from lorafleet.continual.schedule import Scheduler
from lorafleet.registry import Registry
from lorafleet.training.data import load_jsonl

jobs_app = typer.Typer(help="Training jobs: list, show, cancel.", no_args_is_help=True)


def _registry():
    return Registry.open_default(settings())


def _load_base(base: str | None):
    quiet_libraries()
    from lorafleet.base import load_base  # noqa: PLC0415 - defers torch/transformers/triton

    with console.status("loading the base model…"):
        return load_base(base or settings().base)


def _job_row(job) -> list[str]:
    loss = "" if job.loss is None else f"{job.loss:.4f}"
    result = f"#{job.result_number}" if job.result_number else ""
    return [str(job.id), job.ref, job.method, job.state, f"{job.step}/{job.total_steps}", loss, result,
            (job.error or "")[:60]]


def _jobs_table(jobs, title: str) -> Table:
    table = Table(title=title)
    for col in ("id", "adapter", "method", "state", "step", "loss", "revision", "error"):
        table.add_column(col)
    for job in jobs:
        table.add_row(*_job_row(job))
    return table


def run_worker_with_progress(registry, base, *, only: set[int] | None = None, until_idle: bool = True,
                             config=None, stop: threading.Event | None = None, hooks=()):
    """Run a worker in this process with one live progress bar per job."""
    from lorafleet.training.worker import Worker  # noqa: PLC0415 - defers torch

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=console) as bar:
        tasks: dict[int, int] = {}

        def on_progress(job_id: int, step: int, total: int, loss: float) -> None:
            if job_id not in tasks:
                ref = worker.running[job_id].job.ref if job_id in worker.running else str(job_id)
                tasks[job_id] = bar.add_task(f"job {job_id} {ref}", total=total, loss="…")
            bar.update(tasks[job_id], completed=step, loss=f"{loss:.4f}")

        worker = Worker(registry, base, config, on_progress=on_progress, hooks=hooks)
        return worker.run(until_idle=until_idle, only=only, stop=stop)


def register(app: typer.Typer) -> None:
    """Add the training commands to the top-level CLI."""
    @app.command("train")
    @handle_errors
    def train_cmd(
        ref: str = typer.Argument(..., help="adapter tenant/user/name (create it with `lorafleet adapters create`)"),
        data: Path = typer.Option(..., "--data", help="JSONL: chat examples (sft) or preference pairs (dpo)"),
        method: str = typer.Option("sft", help="sft | dpo"),
        rank: int = typer.Option(8, help="LoRA rank 1..64"),
        alpha: float | None = typer.Option(None, help="LoRA alpha (default 2 x rank)"),
        targets: str = typer.Option("all", help="attention, mlp, all, or a comma list of projections"),
        steps: int = typer.Option(30, min=1, help="optimizer steps"),
        lr: float = typer.Option(1e-3, help="learning rate"),
        batch_size: int = typer.Option(4, "--batch-size", min=1, help="this user's rows per step"),
        max_len: int = typer.Option(256, "--max-len", min=8, help="tokens per example; longer ones are truncated"),
        beta: float = typer.Option(0.1, help="DPO temperature"),
        seed: int = typer.Option(0),
        from_scratch: bool = typer.Option(False, "--from-scratch", help="do not warm-start from the live revision"),
        create: bool = typer.Option(False, "--create", help="create the adapter identity if it does not exist"),
        wait: bool = typer.Option(False, "--wait", help="run the job in this process and wait, with a progress bar"),
        base: str | None = typer.Option(None, "--base", help="base for --wait (default $LORAFLEET_BASE or SmolLM2)"),
        base_dtype: str | None = BaseDtypeOpt,
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Queue a training job for a personal adapter (``--wait`` runs it here)."""
        use_base_dtype(base_dtype)
        from lorafleet.adapters import LoraSpec  # noqa: PLC0415 - defers torch
        from lorafleet.training.jobs import JobQueue  # noqa: PLC0415 - defers torch
        from lorafleet.training.trainer import TrainConfig  # noqa: PLC0415 - defers torch

        spec = LoraSpec(rank=rank, alpha=alpha if alpha is not None else 2.0 * rank, target_modules=targets)
        config = TrainConfig(method=method, steps=steps, lr=lr, batch_size=batch_size, max_len=max_len, beta=beta,
                             seed=seed)
        dataset = load_jsonl(data, method)  # validated before anything is written
        registry = _registry()
        if create:
            registry.create_adapter(ref, exist_ok=True, creator=os.environ.get("USER", "cli"))
        queue = JobQueue(registry)
        job = queue.submit(ref, dataset, spec, config, creator=os.environ.get("USER", "cli"),
                           warm_start="none" if from_scratch else "live")
        if not wait:
            if as_json:
                print_json(job.to_dict())
            else:
                console.print(f"queued job {job.id} for {job.ref} ({len(dataset)} examples, {steps} steps); "
                              "run `lorafleet worker` to train it")
            return
        run_worker_with_progress(registry, _load_base(base), only={job.id})
        job = queue.get(job.id)
        if as_json:
            print_json(job.to_dict())
        else:
            console.print(_jobs_table([job], "result"))
        if job.state != "succeeded":
            raise typer.Exit(1)

    @app.command("worker")
    @handle_errors
    def worker_cmd(
        once: bool = typer.Option(False, "--once", help="exit when the queue is empty"),
        max_jobs: int = typer.Option(8, "--max-jobs", min=1, help="users packed into one step"),
        lease: float = typer.Option(120.0, "--lease", help="seconds before a dead worker's jobs are reclaimed"),
        checkpoint_every: int = typer.Option(10, "--checkpoint-every", min=1),
        base: str | None = typer.Option(None, "--base"),
        base_dtype: str | None = BaseDtypeOpt,
        schedules: bool = typer.Option(True, "--schedules/--no-schedules",
                                       help="also run scheduled personal updates (see `lorafleet schedule`)"),
    ) -> None:
        """Take training jobs from the queue and train them, several users per step."""
        use_base_dtype(base_dtype)
        from lorafleet.training.worker import WorkerConfig  # noqa: PLC0415 - defers torch

        config = WorkerConfig(max_jobs=max_jobs, lease_seconds=lease, checkpoint_every=checkpoint_every)
        registry = _registry()
        b = _load_base(base)
        console.print(f"worker ready on {b.name}; waiting for jobs (Ctrl-C to stop)")
        stop = threading.Event()
        try:
            hooks = [Scheduler(registry, b, min_interval_s=0.0 if once else 5.0).tick] if schedules else []
            finished = run_worker_with_progress(registry, b, until_idle=once, config=config, stop=stop, hooks=hooks)
        except KeyboardInterrupt:
            stop.set()
            return
        console.print(_jobs_table(finished, "finished by this worker"))

    app.add_typer(jobs_app, name="jobs")


@jobs_app.command("ls")
@handle_errors
def jobs_ls(
    state: str | None = typer.Option(None, help="queued | running | succeeded | failed | cancelled"),
    adapter: str | None = typer.Option(None, "--adapter", help="only this tenant/user/name"),
    limit: int = typer.Option(50, min=1, max=1000),
    before: int | None = typer.Option(None, help="page: jobs with id below this"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List training jobs, newest first."""
    from lorafleet.training.jobs import JobQueue  # noqa: PLC0415 - defers torch

    jobs = JobQueue(_registry()).list(state=state, ref=adapter, limit=limit, before_id=before)
    if as_json:
        print_json([j.to_dict() for j in jobs])
    else:
        console.print(_jobs_table(jobs, "training jobs"))


@jobs_app.command("show")
@handle_errors
def jobs_show(job_id: int, as_json: bool = typer.Option(False, "--json")) -> None:
    """One job in full: config, progress, loss curve, result."""
    from lorafleet.training.jobs import JobQueue  # noqa: PLC0415 - defers torch

    job = JobQueue(_registry()).get(job_id)
    if as_json:
        print_json(job.to_dict())
        return
    table = Table(title=f"job {job.id}", show_header=False)
    for key, value in job.to_dict().items():
        if key == "losses":
            value = " ".join(f"{v:.3f}" for v in value[-20:])
        table.add_row(key, str(value))
    console.print(table)


@jobs_app.command("cancel")
@handle_errors
def jobs_cancel(job_id: int) -> None:
    """Cancel a queued job now, or a running one at its next step."""
    from lorafleet.training.jobs import JobQueue  # noqa: PLC0415 - defers torch

    job = JobQueue(_registry()).cancel(job_id)
    console.print(f"job {job.id}: {job.state}{' (cancel requested)' if job.cancel_requested else ''}")
