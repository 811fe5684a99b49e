"""``lorafleet`` — the command line: the root app; every command group is a module of this package."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lorafleet.cli import adapters, bench, continual, evaluate, serve, train
from lorafleet.cli.common import BaseDtypeOpt, console, handle_errors, print_json, settings, use_base_dtype
from lorafleet.cli.demo import run_demo
from lorafleet.config import Settings, quiet_libraries
from lorafleet.serving.params import EngineConfig, SamplingParams

app = typer.Typer(help="lorafleet: one shared base LLM, many persistent personal models.", no_args_is_help=True)
base_app = typer.Typer(help="The shared base model.", no_args_is_help=True)
lora_app = typer.Typer(help="LoRA adapter directories in the PEFT format.", no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(lora_app, name="lora")


app.add_typer(adapters.app, name="adapters", help="The adapter registry: identities, revisions, aliases.")
train.register(app)
evaluate.register(app)  # eval, promote, rollback, report, stack-report, personas
serve.register(app)
continual.register(app)
bench.register(app)



@app.callback()
def _root(ctx: typer.Context) -> None:
    ctx.obj = Settings.from_env()  # read once; every command takes its settings from here (cli.common.settings)


@app.command("config")
@handle_errors
def config_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON"),
               reveal: bool = typer.Option(False, "--reveal", help="show secrets (the admin key) in clear")) -> None:
    """The effective settings: each value, the environment variable it comes from, and what it means."""
    rows = settings().describe(reveal=reveal)
    if as_json:
        print_json({row["name"]: {k: v for k, v in row.items() if k != "name"} for row in rows})
        return
    table = Table(title="lorafleet settings")
    for col in ("setting", "variable", "value", "source", "meaning"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["env"], row["value"] or "-", row["source"], row["help"])
    console.print(table)


BaseOpt = typer.Option(None, "--base", help="base name or path (default: $LORAFLEET_BASE or smollm2-135m-instruct)")


def _base_name(base: str | None) -> str | None:
    return base or settings().base


def _load(base: str | None):
    quiet_libraries()
    from lorafleet.base import load_base  # noqa: PLC0415 - torch import is slow; only when needed

    with console.status("loading the base model…"):
        return load_base(_base_name(base))


@base_app.command("info")
@handle_errors
def base_info(base: str | None = BaseOpt, base_dtype: str | None = BaseDtypeOpt,
              as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Name, parameters, layers, dims, precision, fingerprint and load time of the base."""
    use_base_dtype(base_dtype)
    info = _load(base).info()
    if as_json:
        print_json(info)
        return
    table = Table(title="base model", show_header=False)
    for key, value in info.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    console.print(table)


@lora_app.command("new")
@handle_errors
def lora_new(
    directory: Path = typer.Argument(..., help="output PEFT directory"),
    rank: int = typer.Option(8, help="LoRA rank (1..64)"),
    alpha: float = typer.Option(16.0, help="LoRA alpha (scaling = alpha / rank)"),
    dropout: float = typer.Option(0.0, help="LoRA dropout (training only)"),
    targets: str = typer.Option("attention", help="attention, mlp, all, or a comma list of projections"),
    init: str = typer.Option("standard", help="standard (B = 0, starts as the base) or random"),
    seed: int = typer.Option(0, help="init seed"),
    base: str | None = BaseOpt,
) -> None:
    """Create a new adapter for the base and write it in the PEFT format."""
    from lorafleet.adapters import LoraAdapter, LoraSpec, save_peft  # noqa: PLC0415 - defers torch

    spec = LoraSpec(rank=rank, alpha=alpha, dropout=dropout, target_modules=targets)
    b = _load(base)
    adapter = LoraAdapter.create(b, spec, seed=seed, init=init)
    save_peft(adapter, directory)
    s = adapter.summary(b)
    console.print(f"wrote {directory}: rank {s['rank']}, {s['modules']} modules, {s['parameters']:,} parameters, "
                  f"{s['bytes'] / 1024:.1f} KiB ({s['percent_of_base']:.3f}% of the base)")


@lora_app.command("inspect")
@handle_errors
def lora_inspect(
    directory: Path = typer.Argument(..., help="PEFT adapter directory"),
    base: str | None = BaseOpt,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Validate an adapter directory against the base and report its size."""
    from lorafleet.adapters import load_peft  # noqa: PLC0415 - defers torch

    b = _load(base)
    summary = load_peft(directory, b).summary(b)
    if as_json:
        print_json(summary)
        return
    table = Table(title=str(directory), show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)


@app.command("generate")
@handle_errors
def generate_cmd(
    prompt: str = typer.Argument(..., help="user message (the base's chat template is applied)"),
    adapter: Path | None = typer.Option(None, "--adapter", help="PEFT adapter directory"),
    compare: bool = typer.Option(False, "--compare", help="also generate without the adapter, side by side"),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, max=4096),
    temperature: float = typer.Option(0.0, min=0.0, max=5.0, help="0 = greedy"),
    seed: int = typer.Option(0),
    base: str | None = BaseOpt,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Generate a reply from the base, optionally through a personal adapter (through the serving engine)."""
    from lorafleet.adapters import load_peft  # noqa: PLC0415 - defers torch
    from lorafleet.serving.engine import Engine  # noqa: PLC0415 - defers torch/transformers
    from lorafleet.serving.sources import DictBlobs  # noqa: PLC0415 - defers torch

    b = _load(base)
    blobs = DictBlobs()
    digest = blobs.put(load_peft(adapter, b)) if adapter else None
    rows = [digest, None] if digest is not None and compare else [digest]
    engine = Engine(b, blobs, EngineConfig(max_batch=2, max_active=1, max_cached=1, max_rank=64))
    try:
        sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        results = engine.generate([[{"role": "user", "content": prompt}]] * len(rows), rows, sampling)
    finally:
        engine.close()
    outs = [r.raise_for_error().text.strip() for r in results]
    labels = ["adapter" if r is not None else "base" for r in rows]
    if as_json:
        print_json({label: text for label, text in zip(labels, outs, strict=True)})
        return
    for label, text in zip(labels, outs, strict=True):
        console.print(f"[bold]{label}[/]: {text}", highlight=False)


@app.command("demo")
@handle_errors
def demo_cmd(
    quick: bool = typer.Option(False, "--quick", help="tiny random model, a few steps (a smoke test)"),
    base: str | None = BaseOpt,
) -> None:
    """The end-to-end tour: load the base, make a personal adapter, generate with and without it."""
    quiet_libraries()
    run_demo(quick=quick, base=_base_name(base))


def main() -> None:
    app()

