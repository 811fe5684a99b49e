"""``lorafleet bench scale-down`` / ``scale-up``: the commands; the logic is in :mod:`lorafleet.bench.scale`."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from lorafleet.cli.common import console, handle_errors, settings
from lorafleet.config import quiet_libraries
from lorafleet.evaluation.errors import EvaluationError

bench_app = typer.Typer(help="Benchmarks that answer a question with a table and plots.", no_args_is_help=True)

OutOpt = typer.Option(None, "--out", help="directory for the .md and .png (default: $LORAFLEET_HOME/reports/scale-…)")
QuickOpt = typer.Option(False, "--quick", help="the tiny model, a few steps: a smoke run in seconds")
PersonasOpt = typer.Option(None, "--personas", help="comma list of shipped personas (default: ahab)")
SeedsOpt = typer.Option(None, "--seeds", help="seeds per persona and format (reliability = spread over them)")
StepsOpt = typer.Option(None, "--steps", help="optimizer steps per user")
BatchOpt = typer.Option(None, "--batch", help="rows per user per step")
NEvalOpt = typer.Option(None, "--n-eval", help="held-out prompts per persona")
TokensOpt = typer.Option(None, "--max-new-tokens", help="greedy tokens per held-out answer")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


def _out_dir(out: Path | None, name: str) -> Path:
    if out is not None:
        return out

    return settings().data_dir / "reports" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _settings(quick: bool, **given):
    from lorafleet.bench.scale import ScaleSettings  # noqa: PLC0415 - defers torch

    overrides = {k: v for k, v in given.items() if v is not None}
    if "personas" in overrides:
        overrides["personas"] = tuple(p.strip() for p in overrides["personas"].split(",") if p.strip())
    return ScaleSettings.quick_settings(**overrides) if quick else ScaleSettings(**overrides)


def _say(text: str) -> None:
    console.print(text, highlight=False)


@bench_app.command("scale-down")
@handle_errors
def scale_down(
    out: Path | None = OutOpt,
    quick: bool = QuickOpt,
    base: str | None = typer.Option(None, "--base", help="base name or path (default smollm2-135m-instruct)"),
    personas: str | None = PersonasOpt,
    formats: str | None = typer.Option(None, "--formats", help="comma list like lora-r8-all,vera-r16-attention"),
    full_grid: bool = typer.Option(False, "--full-grid", help="every rank 1..16 x attention/mlp/all (slower)"),
    codecs: str | None = typer.Option(None, "--codecs", help="comma list of fp32,fp16,int8,q4 (default fp16,int8,q4)"),
    seeds: int | None = SeedsOpt,
    steps: int | None = StepsOpt,
    batch: int | None = BatchOpt,
    lr: float | None = typer.Option(None, "--lr", help="LoRA learning rate (default 8e-3)"),
    vera_lr: float | None = typer.Option(None, "--vera-lr", help="VeRA learning rate (default 5e-2)"),
    n_eval: int | None = NEvalOpt,
    max_new_tokens: int | None = TokensOpt,
) -> None:
    """How small can a personal model be: bytes per user vs habit adherence, held-out loss, seed spread."""
    quiet_libraries()
    from lorafleet.bench.scale import Format, full_formats, run_scale_down, smallest_keeping  # noqa: PLC0415 - defers torch

    fmts = tuple(Format.parse(f) for f in formats.split(",") if f.strip()) if formats else None
    if full_grid:
        fmts = full_formats()
    s = _settings(quick, base=base, personas=personas, formats=fmts, seeds=seeds, steps=steps, batch=batch,
                  lr=lr, vera_lr=vera_lr, n_eval=n_eval, max_new_tokens=max_new_tokens,
                  codecs=tuple(c.strip() for c in codecs.split(",") if c.strip()) if codecs else None)
    result = run_scale_down(s, _out_dir(out, "scale-down"), _say)
    best = smallest_keeping(result["summary"])
    if best is not None:
        _say(f"smallest format keeping >= 90% of rank-8 adherence: {best['format']} {best['codec']}, "
             f"{best['bytes']:,} bytes per user")
    else:
        _say("no format kept >= 90% of rank-8 adherence")
    for path in result["files"]:
        _say(f"wrote {path}")


@bench_app.command("render")
@handle_errors
def render(
    result: Path = typer.Argument(..., help="a scale_down.json or scale_up.json written by scale-down / scale-up"),
    out: Path | None = typer.Option(None, "--out", help="directory for the .md and .png (default: next to the file)"),
) -> None:
    """Redo a scale-down / scale-up report (table and plots) from its saved JSON, without training."""
    quiet_libraries()
    from lorafleet.bench.scale import render_result  # noqa: PLC0415 - defers torch

    for path in render_result(result, out):
        _say(f"wrote {path}")


@bench_app.command("scale-up")
@handle_errors
def scale_up(
    out: Path | None = OutOpt,
    quick: bool = QuickOpt,
    bases: str | None = typer.Option(None, "--bases", help="comma list (default random-init,smollm2-135m-instruct,"
                                     "gemma3-270m); random-init = the --base shape with fresh weights"),
    base: str | None = typer.Option(None, "--base", help="the shape random-init copies (default smollm2-135m-instruct)"),
    personas: str | None = PersonasOpt,
    fmt: str = typer.Option("lora-r8-all", "--format", help="the format trained on every base"),
    seeds: int | None = typer.Option(None, "--seeds", help="seeds per persona (default 1)"),
    steps: int | None = typer.Option(None, "--steps", help="optimizer steps per user (default 8)"),
    checkpoints: str | None = typer.Option(None, "--checkpoints", help="steps at which adherence is measured "
                                           "(default 2,4,8; with --steps: 5,10,20,… and the last)"),
    batch: int | None = BatchOpt,
    lr: float | None = typer.Option(None, "--lr", help="learning rate, the same on every base (default 8e-3)"),
    n_eval: int | None = NEvalOpt,
    max_new_tokens: int | None = TokensOpt,
) -> None:
    """Does a stronger base make it better: adherence, held-out loss, examples to reach 80%, per base."""
    quiet_libraries()
    from lorafleet.bench.scale import Format, examples_to_reach, run_scale_up  # noqa: PLC0415 - defers torch

    cps = None
    if checkpoints:
        try:
            cps = tuple(int(c) for c in checkpoints.split(",") if c.strip())
        except ValueError as exc:
            raise EvaluationError(f"--checkpoints must be a comma list of step numbers, got {checkpoints!r}") from exc
    defaults = {} if quick else {"seeds": 1, "steps": 8, "checkpoints": (2, 4, 8)}
    given = {"seeds": seeds, "steps": steps, "checkpoints": cps}
    merged = {k: given[k] if given[k] is not None else defaults.get(k) for k in given}
    if steps is not None and cps is None:
        merged["checkpoints"] = None  # derived from --steps
    s = _settings(quick, base=base, personas=personas, batch=batch, lr=lr, n_eval=n_eval, max_new_tokens=max_new_tokens,
                  bases=tuple(b.strip() for b in bases.split(",") if b.strip()) if bases else None, **merged)
    result = run_scale_up(s, _out_dir(out, "scale-up"), _say, Format.parse(fmt))
    for b in result["bases"]:
        reach = examples_to_reach(b["curve"])
        _say(f"{b['base']}: examples to 80% adherence: {reach if reach is not None else 'not reached'}")
    for name, why in result["blocked"].items():
        _say(f"{name}: not measured ({why})")
    for path in result["files"]:
        _say(f"wrote {path}")
