"""CLI: ``lorafleet eval | promote | rollback | report | stack-report | personas ...``.

The lead mounts these on the top-level app with :func:`register`. The registry comes from the environment
(``LORAFLEET_DB_URL`` / ``LORAFLEET_BLOB_URL`` / ``LORAFLEET_HOME``), the base from ``--base`` or
``LORAFLEET_BASE``. Errors print one line and exit 2; a refused promotion exits 1.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import typer
from rich.table import Table

from lorafleet.cli.common import BaseDtypeOpt, actor_name, console, handle_errors, print_json, settings, use_base_dtype
from lorafleet.config import quiet_libraries
from lorafleet.evaluation.baselines import CONDITIONS, DEFAULT_K, BaselineConfig, parse_conditions
from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.gate import GateConfig, promote, rollback
from lorafleet.evaluation.generation import Backend
from lorafleet.evaluation.personas import SHIPPED, Persona, generate_personas, shipped_personas, write_personas
from lorafleet.evaluation.stacks import stack_report
from lorafleet.registry import Registry

personas_app = typer.Typer(help="Synthetic personas with checkable habits (train/eval data).", no_args_is_help=True)

BaseOpt = typer.Option(None, "--base", help="base name or path (default: $LORAFLEET_BASE or smollm2-135m-instruct)")
JsonOpt = typer.Option(False, "--json", help="print JSON")
ActorOpt = typer.Option(None, "--actor", help="who (recorded in the audit log; default cli:<OS user>)")
ManifestOpt = typer.Option(None, "--persona-manifest", help="personas.json written by `personas generate`")
BaselinesOpt = typer.Option(None, "--baselines", help=(
    "conditions measured on the same held-out prompts: a comma list of " + ", ".join(CONDITIONS)
    + ", 'all' or 'none' (default: base,in_context,adapter with a persona, none with an eval file)"))
KOpt = typer.Option(None, "--k", min=1, help=(
    f"examples of the user's own training data in the in-context profile (default {DEFAULT_K}, lowered to what "
    "fits the base's positions; given explicitly, a prompt that does not fit is an error)"))
ServingOpt = typer.Option(True, "--serving-cost/--no-serving-cost",
                          help="measure each condition's tok/s and time to first token on the engine")
ServeTokensOpt = typer.Option(8, "--serve-tokens", min=1, max=256, help="new tokens per request when measuring it")
LABELS = {"base": "base", "in_context": "base + in-context", "retrieval": "base + retrieval (BM25)",
          "adapter": "adapter", "adapter_in_context": "adapter + in-context"}


def register(app: typer.Typer, *, backend: Backend | None = None) -> None:
    """Add ``eval``, ``promote``, ``rollback``, ``report`` and the ``personas`` group to ``app``. ``backend``
    generates for the commands that evaluate (None: the default in-process generate; tests pass a stand-in)."""
    app.command("eval")(_with_backend(eval_cmd, backend))
    app.command("promote")(_with_backend(promote_cmd, backend))
    app.command("rollback")(rollback_cmd)
    app.command("report")(report_cmd)
    app.command("stack-report")(_with_backend(stack_report_cmd, backend))
    app.add_typer(personas_app, name="personas")


def _with_backend(cmd, backend: Backend | None):
    """``cmd`` with its ``backend`` argument bound (so it is no command-line option)."""
    sig = inspect.signature(cmd)

    @functools.wraps(cmd)
    def run(**kwargs):
        return cmd(**kwargs, backend=backend)

    run.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "backend"])
    return run


def _registry():
    return Registry()


def _load_base(name: str | None):
    quiet_libraries()
    from lorafleet.base import load_base  # noqa: PLC0415 - torch import is slow; only when needed

    with console.status("loading the base model…"):
        return load_base(name or settings().base)


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.0%}" if pct else f"{x:.4f}"
    return str(x)


def _metrics_table(title: str, m: dict) -> Table:
    table = Table(title=title)
    for col in ("metric", "adapter", "base"):
        table.add_column(col)
    table.add_row("habit adherence", _fmt(m.get("adherence"), True), _fmt(m.get("base_adherence"), True))
    table.add_row("held-out loss", _fmt(m.get("eval_loss")), _fmt(m.get("base_eval_loss")))
    table.add_row("probe perplexity", _fmt(m.get("probe_ppl")), _fmt(m.get("base_probe_ppl")))
    table.add_row("probe accuracy", _fmt(m.get("probe_accuracy"), True), _fmt(m.get("base_probe_accuracy"), True))
    table.add_row("probe retention / agreement", f"{_fmt(m.get('probe_retention'), True)} / "
                  f"{_fmt(m.get('probe_agreement'), True)}", "")
    return table


def baseline_config(baselines: str | None, k: int | None, serving: bool, serve_tokens: int, *, has_persona: bool,
                    probe: bool = True) -> BaselineConfig | None:
    """The ``--baselines`` choice as a :class:`BaselineConfig` (None: measure none). Left unset it is the default
    set where there is a checker (a persona) and none for an eval file; asked for explicitly, an eval file
    without a checker is an error (see ``metrics.baseline_profiles``)."""
    if baselines is None and not has_persona:
        return None
    conditions = parse_conditions(baselines)
    return BaselineConfig(conditions=conditions, k=DEFAULT_K if k is None else k, probe=probe, serving=serving,
                          serve_tokens=serve_tokens, fit_k=k is None)


def baselines_table(title: str, report: dict) -> Table:
    """The baselines of one evaluation: a row per condition (what `lorafleet eval` prints)."""
    table = Table(title=title)
    for col in ("condition", "adherence", "held-out loss", "probe retention", "prompt tokens", "tok/s", "TTFT ms"):
        table.add_column(col)
    for c, r in report["rows"].items():
        table.add_row(LABELS.get(c, c), _fmt(r.get("adherence"), True), _fmt(r.get("eval_loss")),
                      _fmt(r.get("probe_retention"), True), f"{r['prompt_tokens']:.0f}",
                      "-" if r.get("tok_s") is None else f"{r['tok_s']:.1f}",
                      "-" if r.get("ttft_ms") is None else f"{r['ttft_ms']:.0f}")
    return table


def _in_context_cell(m: dict) -> str:
    row = ((m.get("baselines") or {}).get("rows") or {}).get("in_context")
    return "-" if not row else f"{_fmt(row.get('adherence'), True)} ({row['prompt_tokens']:.0f})"


def _evaluate_live_on(base_name: str | None, registry, cand_rev, manifest, backend: Backend | None):
    """For the gate: measure ``live`` on the candidate's eval set (not stored on live)."""
    state = {}

    def evaluate(live_rev, digest: str) -> dict:
        from lorafleet.evaluation.metrics import eval_set_for, evaluate_adapters, load_for_eval  # noqa: PLC0415 - defers torch

        es = eval_set_for(cand_rev, manifest=manifest)
        if es.digest != digest:
            raise EvaluationError(f"the candidate's eval set {es.name!r} changed since it was evaluated; "
                                  f"re-run `lorafleet eval {cand_rev.address}`")
        if "base" not in state:
            state["base"] = _load_base(base_name)
        base = state["base"]
        _, adapter, _ = load_for_eval(registry, live_rev.address, base)  # with its stack, as it is served
        m = cand_rev.provenance.metrics
        with console.status(f"evaluating {live_rev.address} on {es.name}…"):
            return evaluate_adapters(base, [adapter], [es],
                                     max_new_tokens=int(m.get("max_new_tokens") or 48), backend=backend)[0]

    return evaluate


@handle_errors
def eval_cmd(
    address: str = typer.Argument(..., help="t/u/a (live), t/u/a@alias or t/u/a#N"),
    persona: str | None = typer.Option(None, "--persona", help="persona name (shipped, or in --persona-manifest)"),
    eval_file: Path | None = typer.Option(None, "--eval-file", help="SFT JSONL held-out set (no habit checker)"),
    manifest: Path | None = ManifestOpt,
    max_tokens: int = typer.Option(48, "--max-tokens", min=1, max=512, help="greedy tokens per eval prompt"),
    no_probe: bool = typer.Option(False, "--no-probe", help="skip the competence probe (the gate will refuse)"),
    baselines: str | None = BaselinesOpt,
    k: int | None = KOpt,
    serving_cost: bool = ServingOpt,
    serve_tokens: int = ServeTokensOpt,
    base: str | None = BaseOpt,
    base_dtype: str | None = BaseDtypeOpt,
    as_json: bool = JsonOpt,
    backend: Backend | None = None,
) -> None:
    """Evaluate a revision on its user's held-out set and the competence probe, next to the prompt baselines
    (base, base + in-context profile, base + retrieval, adapter, adapter + in-context); store the metrics on it."""
    use_base_dtype(base_dtype)
    from lorafleet.evaluation.metrics import baseline_profiles, eval_set_for, evaluate_revision  # noqa: PLC0415 - defers torch

    reg = _registry()
    try:
        rev = reg.resolve(address)
        es = eval_set_for(rev, persona=persona, eval_file=eval_file, manifest=manifest)
        config = baseline_config(baselines, k, serving_cost, serve_tokens, has_persona=es.persona is not None)
        baseline_profiles([es], config)  # bad input fails here, before the base loads
        b = _load_base(base)
        with console.status(f"evaluating {rev.address} on {es.name} ({len(es)} prompts)…"):
            rev, m = evaluate_revision(reg, rev.address, b, es, max_new_tokens=max_tokens, probe_enabled=not no_probe,
                                       backend=backend, baselines=config)
    finally:
        reg.close()
    if as_json:
        print_json({"address": rev.address, "metrics": m})
        return
    console.print(_metrics_table(f"{rev.address} on {es.name}", m))
    if m.get("baselines"):
        report = m["baselines"]
        console.print(baselines_table(f"baselines on the same {len(es)} held-out prompts (k={report['k']})", report))
    for s in m.get("samples", []):
        mark = {True: "[green]✓[/]", False: "[red]✗[/]", None: " "}[s["ok"]]
        console.print(f"{mark} [bold]{s['prompt']}[/] → {s['response']}", highlight=False)
    for s in m.get("probe_lost") or []:
        console.print(f"[yellow]probe lost[/] [bold]{s['prompt']}[/] → {s['response']}", highlight=False)


@handle_errors
def promote_cmd(
    address: str = typer.Argument(..., help="the revision: t/u/a#N (or t/u/a@candidate)"),
    force: bool = typer.Option(False, "--force", help="bypass the gate (audited as forced)"),
    reason: str = typer.Option("", "--reason", "-r", help="why (recorded in the audit log)"),
    adherence_margin: float = typer.Option(0.05, help="adherence gain over live that wins outright"),
    loss_margin: float = typer.Option(0.02, help="held-out loss drop that wins at equal adherence"),
    max_ppl_ratio: float = typer.Option(1.5, help="probe perplexity may grow at most this factor"),
    min_retention: float = typer.Option(0.75, help="share of the base's correct probe answers kept"),
    require_in_context_margin: float | None = typer.Option(
        None, help="refuse unless adherence reaches the in-context baseline's within this margin (default: report only)"),
    manifest: Path | None = ManifestOpt,
    base: str | None = BaseOpt,
    base_dtype: str | None = BaseDtypeOpt,
    actor: str | None = ActorOpt,
    as_json: bool = JsonOpt,
    backend: Backend | None = None,
) -> None:
    """Promote a candidate to live if the gate passes (evaluating it first if needed); --force bypasses."""
    use_base_dtype(base_dtype)
    from lorafleet.evaluation.metrics import eval_set_for, evaluate_revision  # noqa: PLC0415 - defers torch

    config = GateConfig(adherence_margin=adherence_margin, loss_margin=loss_margin, max_ppl_ratio=max_ppl_ratio,
                        min_probe_retention=min_retention, require_in_context_margin=require_in_context_margin)
    reg = _registry()
    try:
        rev = reg.resolve(address)
        if not force and not rev.provenance.metrics.get("eval_digest"):
            es = eval_set_for(rev, manifest=manifest)  # nothing goes live unevaluated
            b = _load_base(base)
            bconfig = baseline_config(None, None, False, 8, has_persona=es.persona is not None)
            with console.status(f"{rev.address} has no metrics yet; evaluating it on {es.name}…"):
                rev, _ = evaluate_revision(reg, rev.address, b, es, backend=backend, baselines=bconfig)
        decision = promote(reg, rev.address, force=force, reason=reason, config=config, actor=actor_name(actor),
                           evaluate=_evaluate_live_on(base, reg, rev, manifest, backend))
    finally:
        reg.close()
    if as_json:
        print_json(decision.to_dict())
    else:
        color = "green" if decision.promoted else "yellow"
        console.print(f"[bold {color}]{'promoted' if decision.promoted else 'refused'}[/]: {decision.reason}",
                      highlight=False)
    if not decision.promoted:
        raise typer.Exit(1)


@handle_errors
def rollback_cmd(
    ref: str = typer.Argument(..., help="t/u/a"),
    to: int | None = typer.Option(None, "--to", help="revision number (default: the previous live one)"),
    reason: str = typer.Option("", "--reason", "-r", help="why (recorded in the audit log)"),
    actor: str | None = ActorOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Move live back to the previous live revision (or --to N); instant and audited."""

    reg = _registry()
    try:
        entry = rollback(reg, ref, to=to, actor=actor_name(actor), reason=reason)
    finally:
        reg.close()
    if as_json:
        print_json(entry.to_dict())
    else:
        console.print(f"{ref}: live #{entry.from_number} → #{entry.to_number}", highlight=False)


@handle_errors
def report_cmd(
    ref: str = typer.Argument(..., help="t/u/a"),
    audit_limit: int = typer.Option(20, "--audit", min=1, max=1000, help="audit entries to show"),
    as_json: bool = JsonOpt,
) -> None:
    """Revision history with metrics, aliases and provenance, and the audit log."""
    reg = _registry()
    try:
        history = reg.history(ref)
        audit = reg.audit(ref, limit=audit_limit)
    finally:
        reg.close()
    if as_json:
        print_json({"ref": ref, "revisions": [r.to_dict() for r in history], "audit": [e.to_dict() for e in audit]})
        return
    table = Table(title=f"{ref}: revisions")
    for col in ("#", "aliases", "digest", "KiB", "method", "parent", "created", "eval set", "adherence (base)",
                "in-context (tokens)", "loss (base)", "probe ppl×", "gate"):
        table.add_column(col)
    for r in history:
        p, m = r.provenance, r.provenance.metrics
        gate = m.get("gate", {})
        table.add_row(
            str(r.number), ", ".join(sorted(r.aliases)) or "-", r.digest[:12], f"{r.size / 1024:.0f}", p.method,
            str(p.parent or "-"), r.created_at.strftime("%Y-%m-%d %H:%M"), str(m.get("eval_set", "-")),
            f"{_fmt(m.get('adherence'), True)} ({_fmt(m.get('base_adherence'), True)})", _in_context_cell(m),
            f"{_fmt(m.get('eval_loss'))} ({_fmt(m.get('base_eval_loss'))})",
            _fmt(m.get("probe_ppl_ratio")), gate.get("decision", "-"),
        )
    console.print(table)
    log = Table(title=f"{ref}: audit log (newest first)")
    for col in ("when", "action", "alias", "from → to", "actor", "reason"):
        log.add_column(col)
    for e in audit:
        log.add_row(e.at.strftime("%Y-%m-%d %H:%M:%S"), e.action, e.alias or "-",
                    f"{e.from_number or '-'} → {e.to_number or '-'}", e.actor, e.reason)
    console.print(log)


@handle_errors
def stack_report_cmd(
    ref: str = typer.Argument(..., help="the parent t/u/a that moved (e.g. acme/_org/support)"),
    everyone: bool = typer.Option(False, "--all", help="also re-evaluate members whose parents did not move"),
    no_store: bool = typer.Option(False, "--no-store", help="do not record the checks on the member revisions"),
    manifest: Path | None = ManifestOpt,
    base: str | None = BaseOpt,
    base_dtype: str | None = BaseDtypeOpt,
    actor: str | None = ActorOpt,
    as_json: bool = JsonOpt,
    backend: Backend | None = None,
) -> None:
    """After a parent moved: re-evaluate its stack's members on the new parents; flag those below the gate.

    A report only: no alias moves. Exits 1 when a member is flagged.
    """
    use_base_dtype(base_dtype)

    reg = _registry()
    try:
        reg.get_adapter(ref)  # a clear error before loading the base
        b = _load_base(base)
        with console.status(f"re-evaluating the members stacked on {ref}…"):
            checks = stack_report(reg, b, ref, everyone=everyone, store=not no_store, manifest=manifest,
                                  actor=actor_name(actor), backend=backend)
    finally:
        reg.close()
    if as_json:
        print_json({"parent": ref, "members": [c.to_dict() for c in checks]})
    else:
        table = Table(title=f"members stacked on {ref}")
        for col in ("member", "live", "parents (before → now)", "adherence", "loss", "probe ppl×", "status", "why"):
            table.add_column(col)
        for c in checks:
            moved = " ".join(f"{p.get('address', '?')}→{q['address']}" for p, q in zip(c.parents_before, c.parents_now,
                                                                                     strict=False)
                             if p.get("digest") != q["digest"]) or "-"
            table.add_row(c.ref, c.revision or "-", moved,
                          f"{_fmt(c.before.get('adherence'), True)} → {_fmt(c.after.get('adherence'), True)}",
                          f"{_fmt(c.before.get('eval_loss'))} → {_fmt(c.after.get('eval_loss'))}",
                          _fmt(c.after.get("probe_ppl_ratio")),
                          f"[bold red]{c.status}[/]" if c.flagged else c.status, c.reason)
        console.print(table)
    if any(c.flagged for c in checks):
        raise typer.Exit(1)


# --------------------------------------------------------------------------- personas


def _persona_list(manifest: Path | None):
    if manifest is None:
        return shipped_personas()
    import json  # noqa: PLC0415

    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["personas"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluationError(f"{manifest}: not a personas manifest ({exc})") from exc
    return [Persona.from_dict(e) for e in entries]


@personas_app.command("ls")
@handle_errors
def personas_ls(manifest: Path | None = ManifestOpt, as_json: bool = JsonOpt) -> None:
    """List the shipped personas (or those of a generated manifest)."""
    personas = _persona_list(manifest)
    if as_json:
        print_json([{**p.to_dict(), "description": p.describe()} for p in personas])
        return
    table = Table(title="personas")
    for col in ("name", "habit", "description", "seed", "train", "eval"):
        table.add_column(col)
    for p in personas:
        table.add_row(p.name, p.habit, p.describe(), str(p.seed), str(p.n_train), str(p.n_eval))
    console.print(table)


@personas_app.command("show")
@handle_errors
def personas_show(
    name: str = typer.Argument(..., help="persona name"),
    split: str = typer.Option("eval", "--split", help="train or eval"),
    limit: int = typer.Option(5, "--limit", min=0, help="examples to show (0 = all)"),
    manifest: Path | None = ManifestOpt,
    as_json: bool = JsonOpt,
) -> None:
    """A persona's habit and example records."""
    if split not in ("train", "eval"):
        raise EvaluationError(f"--split must be 'train' or 'eval', got {split!r}")
    persona = next((p for p in _persona_list(manifest) if p.name == name), None)
    if persona is None:
        raise EvaluationError(f"no persona named {name!r}; see `lorafleet personas ls`")
    records = getattr(persona.data(), split)
    shown = records if limit == 0 else records[:limit]
    if as_json:
        print_json({**persona.to_dict(), "description": persona.describe(), "split": split, "count": len(records),
                    "records": shown})
        return
    console.print(f"[bold]{persona.name}[/]: {persona.describe()} — {len(records)} {split} examples", highlight=False)
    for r in shown:
        console.print(f"[bold]user:[/] {r['messages'][0]['content']}\n[bold]assistant:[/] {r['messages'][1]['content']}\n",
                      highlight=False)


@personas_app.command("generate")
@handle_errors
def personas_generate(
    out: Path = typer.Option(..., "--out", help="output directory"),
    count: int = typer.Option(8, "--count", min=0, help="how many personas"),
    seed: int = typer.Option(0, "--seed", help="generator seed (same seed, same personas and files)"),
    kinds: list[str] | None = typer.Option(None, "--kind", help="habit kind(s) to cycle through (default: all)"),
    n_train: int = typer.Option(48, "--n-train", min=1),
    n_eval: int = typer.Option(16, "--n-eval", min=1),
    shipped: bool = typer.Option(False, "--shipped", help="write the shipped personas instead (regenerates them)"),
    as_json: bool = JsonOpt,
) -> None:
    """Write persona train/eval JSONL files and a personas.json manifest."""

    personas = list(SHIPPED) if shipped else generate_personas(count, seed, kinds=kinds, n_train=n_train, n_eval=n_eval)
    manifest = write_personas(personas, out)
    if as_json:
        print_json({"out": str(out), **manifest})
        return
    console.print(f"wrote {len(personas)} personas to {out} ({out / 'personas.json'})", highlight=False)
