"""``lorafleet adapters ...``: inspect and manage the registry from a shell.

The registry is chosen by the environment, like everywhere else in lorafleet:
``LORAFLEET_DB_URL`` / ``LORAFLEET_BLOB_URL``, else SQLite + files under ``LORAFLEET_HOME``.
Human output is a rich table; ``--json`` prints machine-readable JSON. Errors print one line to
stderr and exit with status 2.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lorafleet.cli.common import actor_name, console, err_console, handle_errors, settings
from lorafleet.config import quiet_libraries
from lorafleet.registry import imports
from lorafleet.registry.exports import FORMATS, check_target, export_revision
from lorafleet.registry.records import AdapterInfo, AuditEntry, RevisionInfo
from lorafleet.registry.registry import Registry

app = typer.Typer(
    help="Adapter registry: identities, immutable revisions, aliases (live/candidate/...), audit log and gc.",
    no_args_is_help=True,
    add_completion=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ReasonOpt = Annotated[str, typer.Option("--reason", "-r", help="Why (recorded in the audit log).")]
ActorOpt = Annotated[str | None, typer.Option("--actor", help="Who (default: cli:<OS user>).")]


def _open() -> Registry:
    return Registry.open_default(settings())


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _aliases(mapping: dict[str, int]) -> str:
    return ", ".join(f"{name}→#{num}" for name, num in sorted(mapping.items())) or "-"


def _adapters_table(items: list[AdapterInfo], title: str | None = None) -> Table:
    table = Table(title=title)
    table.add_column("ref", no_wrap=True)
    for col in ("latest", "aliases", "parent", "creator", "created"):
        table.add_column(col, overflow="fold")
    for a in items:
        table.add_row(a.ref, f"#{a.latest}" if a.latest else "-", _aliases(a.aliases), a.parent or "-", a.creator,
                      _when(a.created_at))
    return table


def _revisions_table(revs: list[RevisionInfo], title: str | None = None) -> Table:
    table = Table(title=title)
    table.add_column("#", no_wrap=True)
    table.add_column("digest", no_wrap=True)
    for col in ("size", "aliases", "parent", "method", "base", "creator", "created"):
        table.add_column(col, overflow="fold")
    for r in revs:
        p = r.provenance
        table.add_row(str(r.number), r.digest[:12], f"{r.size:,}", ", ".join(r.aliases) or "-",
                      f"#{p.parent}" if p.parent else "-", p.method, p.base_fingerprint[:16], p.creator,
                      _when(r.created_at))
    return table


def _audit_table(entries: list[AuditEntry]) -> Table:
    table = Table()
    for col in ("id", "at", "ref", "action", "alias", "from", "to", "actor", "reason"):
        table.add_column(col, overflow="fold", no_wrap=col in ("id", "ref"))
    for e in entries:
        table.add_row(str(e.id), _when(e.at), e.ref, e.action, e.alias or "-",
                      "-" if e.from_number is None else f"#{e.from_number}",
                      "-" if e.to_number is None else f"#{e.to_number}", e.actor, e.reason)
    return table


@app.command()
@handle_errors
def create(
    ref: Annotated[str, typer.Argument(help="tenant/user/adapter")],
    description: Annotated[str, typer.Option("--description", "-d", help="Free text.")] = "",
    exist_ok: Annotated[bool, typer.Option("--exist-ok", help="Succeed if it already exists.")] = False,
    parent: Annotated[str | None, typer.Option(
        "--parent", help="Stack it on this adapter of the same tenant (e.g. acme/_org/support).")] = None,
    from_profile: Annotated[str | None, typer.Option(
        "--from-profile", help="Generate revision #1 from this description of the user (docs/instant.md).")] = None,
    examples: Annotated[str | None, typer.Option(
        "--examples", help="With --from-profile: a JSONL file of up to 8 example conversations.")] = None,
    generator: Annotated[str | None, typer.Option(
        "--generator", help="With --from-profile: the generator revision (default _instant/generators/<base>).")] = None,
    base: Annotated[str | None, typer.Option("--base", help="With --from-profile: the base (default $LORAFLEET_BASE).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an adapter identity (no revisions yet), optionally stacked on a parent adapter; or, with
    --from-profile, generate its first revision from a profile (a candidate, evaluated and gated like any other)."""
    if from_profile is not None:
        _create_generated(ref, from_profile, examples, generator, base, parent, exist_ok, as_json)
        return
    if examples is not None or generator is not None:
        typer.echo("error: --examples and --generator go with --from-profile", err=True)
        raise typer.Exit(2)
    with _open() as reg:
        info = reg.create_adapter(ref, creator=actor_name(None), description=description, exist_ok=exist_ok,
                                  parent=parent)
    if as_json:
        _echo_json(info.to_dict())
    else:
        on = f" on top of [bold]{info.parent}[/bold]" if info.parent else ""
        Console().print(f"created [bold]{info.ref}[/bold]{on}")


def _create_generated(ref: str, profile: str, examples: str | None, generator: str | None, base: str | None,
                      parent: str | None, exist_ok: bool, as_json: bool) -> None:
    from lorafleet.instant import InstantError, check_profile, create_from_profile, read_examples  # noqa: PLC0415 - defers torch

    if parent is not None or exist_ok:
        raise InstantError("--from-profile makes a new adapter's first revision: it takes no --parent / --exist-ok")
    records = None
    if examples is not None:
        try:
            records = read_examples(Path(examples).read_text(encoding="utf-8"))
        except OSError as exc:
            raise InstantError(f"cannot read --examples {examples!r}: {exc.strerror or exc}") from None
    check_profile(profile, records)  # bad input fails before the base loads
    loaded = _load_base(base)
    with _open() as reg:
        out = create_from_profile(reg, loaded, ref, profile, records, generator=generator, creator=actor_name(None))
    rev = out.revision
    if as_json:
        _echo_json({**rev.to_dict(), "generation_seconds": out.seconds, "generator": out.generator})
    else:
        Console().print(f"generated [bold]{rev.address}[/bold] in {out.seconds:.2f}s from {out.generator} "
                        f"({rev.size:,} bytes, aliases {', '.join(rev.aliases)}); evaluate and gate it with "
                        f"`lorafleet eval {rev.address}` / `lorafleet promote {rev.address}`")


@app.command("build-generator")
@handle_errors
def build_generator_(
    personas: Annotated[int, typer.Option("--personas", help="Corpus personas of the family (at most 685).")] = 200,
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps per corpus adapter (default 24).")] = None,
    pack: Annotated[int | None, typer.Option("--pack", help="Users per packed optimizer step (default 16).")] = None,
    max_len: Annotated[int | None, typer.Option("--max-len", help="Training tokens per row (default 96).")] = None,
    ref: Annotated[str | None, typer.Option("--ref", help="Where (default _instant/generators/<base>).")] = None,
    base: Annotated[str | None, typer.Option("--base", help="The base (default $LORAFLEET_BASE).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the corpus (cached under $LORAFLEET_HOME/instant-corpus), fit the generator that --from-profile uses
    and commit it as the next revision of its ref, live (docs/instant.md)."""
    from lorafleet import instant  # noqa: PLC0415 - defers torch

    loaded = _load_base(base)
    corpus_personas, _ = instant.split_family(personas, 0, seed=0)
    cfg = instant.CorpusConfig.with_options(instant.DEFAULT_SPEC, steps=steps, pack=pack, max_len=max_len)
    corpus = instant.build_corpus(loaded, corpus_personas, cfg, settings().data_dir / "instant-corpus",
                          say=lambda line: err_console.print(line))
    gen = instant.build_generator(loaded, corpus, cfg)
    with _open() as reg:
        rev = instant.commit_generator(reg, gen, ref or instant.default_generator_ref(loaded),
                                       creator=actor_name(None))
    if as_json:
        _echo_json(rev.to_dict())
    else:
        Console().print(f"generator [bold]{rev.address}[/bold] (live): {len(corpus_personas)} personas, corpus "
                        f"{corpus.digest[:12]}…, {gen.components} components, {rev.size:,} bytes")


@app.command("parent")
@handle_errors
def parent_(
    ref: Annotated[str, typer.Argument(help="tenant/user/adapter")],
    parent: Annotated[str | None, typer.Argument(help="New parent tenant/user/adapter (omit with --detach).")] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Remove the parent: serve the adapter alone.")] = False,
    reason: ReasonOpt = "",
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stack REF on PARENT (validated: same tenant, no cycle, at most 3 levels), or --detach it (audited)."""
    if detach == (parent is not None):
        typer.echo("error: give either a PARENT or --detach", err=True)
        raise typer.Exit(2)
    with _open() as reg:
        entry = reg.set_parent(ref, parent, actor=actor_name(actor), reason=reason)
    if as_json:
        _echo_json(entry.to_dict())
    else:
        Console().print(f"{entry.ref}: {entry.reason}  [dim](audit #{entry.id})[/dim]")


@app.command("stack")
@handle_errors
def stack_(
    address: Annotated[str, typer.Argument(help="t/u/a, t/u/a@alias or t/u/a#N")],
    as_json: JsonOpt = False,
) -> None:
    """Show the revisions a request for ADDRESS applies, root first (each parent at its own live)."""
    with _open() as reg:
        revs = reg.resolve_stack(address)
    if as_json:
        _echo_json([r.to_dict() for r in revs])
        return
    table = Table(title=f"stack of {address}")
    for col in ("level", "revision", "digest", "aliases", "size"):
        table.add_column(col, no_wrap=True)
    for i, r in enumerate(revs):
        table.add_row(str(i), r.address, r.digest[:12], ", ".join(r.aliases) or "-", f"{r.size:,}")
    Console().print(table)


@app.command("ls")
@handle_errors
def list_(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    user: Annotated[str | None, typer.Option(help="Only this user.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Ref prefix, e.g. 'acme/' or 'acme/al'.")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Cursor printed by the previous page.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List adapters, a page at a time (ordered by ref)."""
    with _open() as reg:
        items, next_cursor = reg.list_adapters(tenant=tenant, user=user, prefix=prefix, limit=limit, cursor=cursor)
    if as_json:
        _echo_json({"adapters": [a.to_dict() for a in items], "next_cursor": next_cursor})
        return
    console = Console()
    console.print(_adapters_table(items))
    if next_cursor:
        console.print(f"more: --cursor {next_cursor}")


@app.command()
@handle_errors
def show(
    address: Annotated[str, typer.Argument(help="t/u/a (adapter + live revision), t/u/a@alias or t/u/a#N")],
    as_json: JsonOpt = False,
) -> None:
    """Show an adapter and a revision with its full provenance."""
    with _open() as reg:
        bare = "@" not in address and "#" not in address
        ref = address.split("@", 1)[0].split("#", 1)[0]
        info = reg.get_adapter(ref)
        if bare:
            rev = reg.resolve(address) if "live" in info.aliases else None
        else:
            rev = reg.resolve(address)
    if as_json:
        _echo_json({"adapter": info.to_dict(), "revision": rev.to_dict() if rev else None})
        return
    console = Console()
    console.print(_adapters_table([info]))
    if rev is None:
        console.print(f"no live revision; see `lorafleet adapters history {info.ref}`")
        return
    table = Table(title=rev.address, show_header=False)
    table.add_column("field")
    table.add_column("value")
    table.add_row("digest", rev.digest)
    table.add_row("size", f"{rev.size:,} bytes")
    table.add_row("aliases", ", ".join(rev.aliases) or "-")
    table.add_row("committed", _when(rev.created_at))
    for key, value in rev.provenance.to_dict().items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else ("-" if value is None else str(value))
        table.add_row(key, text)
    console.print(table)


@app.command()
@handle_errors
def history(
    ref: Annotated[str, typer.Argument(help="tenant/user/adapter")],
    as_json: JsonOpt = False,
) -> None:
    """List an adapter's revisions (oldest first) with their aliases."""
    with _open() as reg:
        revs = reg.history(ref)
    if as_json:
        _echo_json([r.to_dict() for r in revs])
    else:
        Console().print(_revisions_table(revs, title=ref))


@app.command()
@handle_errors
def alias(
    ref: Annotated[str, typer.Argument(help="tenant/user/adapter")],
    name: Annotated[str, typer.Argument(metavar="ALIAS", help="Alias name, e.g. live or candidate.")],
    number: Annotated[int | None, typer.Argument(metavar="N", help="Revision number (omit with --delete).")] = None,
    reason: ReasonOpt = "",
    delete: Annotated[bool, typer.Option("--delete", help="Remove the alias instead of moving it.")] = False,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Point ALIAS at revision N (atomic, audited), or remove it with --delete."""
    if delete == (number is not None):
        typer.echo("error: give either a revision number N or --delete", err=True)
        raise typer.Exit(2)
    with _open() as reg:
        if delete:
            entry = reg.delete_alias(ref, name, actor=actor_name(actor), reason=reason)
        else:
            entry = reg.set_alias(ref, name, number, actor=actor_name(actor), reason=reason)
    _print_move(entry, as_json)


def _print_move(entry: AuditEntry, as_json: bool) -> None:
    if as_json:
        _echo_json(entry.to_dict())
        return
    src = "-" if entry.from_number is None else f"#{entry.from_number}"
    dst = "(deleted)" if entry.to_number is None else f"#{entry.to_number}"
    Console().print(f"{entry.ref}@{entry.alias}: {src} → {dst}  [dim](audit #{entry.id})[/dim]")


@app.command()
@handle_errors
def rollback(
    ref: Annotated[str, typer.Argument(help="tenant/user/adapter")],
    to: Annotated[int | None, typer.Option("--to", help="Revision to make live (default: the previous live).")] = None,
    reason: ReasonOpt = "",
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move `live` back to the previous live revision (or to --to N)."""
    with _open() as reg:
        entry = reg.rollback(ref, to=to, actor=actor_name(actor), reason=reason)
    _print_move(entry, as_json)


@app.command()
@handle_errors
def gc(
    keep_last: Annotated[int, typer.Option("--keep-last", help="Revisions to keep per adapter (plus aliased).")] = 10,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what would be deleted.")] = False,
    grace: Annotated[float, typer.Option("--grace", help="Keep unreferenced blobs younger than this (s).")] = 900.0,
    as_json: JsonOpt = False,
) -> None:
    """Apply retention (keep last N + every aliased revision), then delete unreferenced blobs."""
    with _open() as reg:
        report = reg.gc(keep_last=keep_last, dry_run=dry_run, grace_s=grace)
    if as_json:
        _echo_json(report.to_dict())
        return
    verb = "would delete" if dry_run else "deleted"
    console = Console()
    console.print(
        f"{verb} {len(report.deleted_revisions)} revisions and {len(report.deleted_blobs)} blobs "
        f"({report.freed_bytes:,} bytes); {report.kept_revisions} revisions kept"
    )
    for address in report.deleted_revisions[:50]:
        console.print(f"  {address}")
    if len(report.deleted_revisions) > 50:
        console.print(f"  ... and {len(report.deleted_revisions) - 50} more (use --json for all)")


@app.command("audit")
@handle_errors
def audit_(
    ref: Annotated[str | None, typer.Argument(help="tenant/user/adapter (default: all adapters)")] = None,
    limit: Annotated[int, typer.Option(help="Newest entries to show.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Show the append-only audit log (alias moves, rollbacks, gc deletions), newest first."""
    with _open() as reg:
        entries = reg.audit(ref, limit=limit)
    if as_json:
        _echo_json([e.to_dict() for e in entries])
    else:
        Console().print(_audit_table(entries))


# ------------------------------------------------------------------ import / export (need the base)

BaseOpt = Annotated[str | None, typer.Option(
    "--base", help="base name or path (default: $LORAFLEET_BASE or smollm2-135m-instruct)")]


def _load_base(base: str | None):
    import os  # noqa: PLC0415

    from lorafleet.base import load_base  # noqa: PLC0415 - torch import is slow; only when needed
    quiet_libraries()
    with console.status("loading the base model…"):
        return load_base(base or os.environ.get("LORAFLEET_BASE"))


@app.command("import")
@handle_errors
def import_(
    paths: Annotated[list[str], typer.Argument(help="PEFT folders, folders of them, or fsspec URLs (s3://…)")],
    as_ref: Annotated[str | None, typer.Option(
        "--as", help="tenant/user/adapter for one adapter, or tenant/user to name each after its folder "
                     "(default: local/lora/<folder>)")] = None,
    alias: Annotated[str, typer.Option("--alias", help="alias to point at each new revision: candidate or live")]
    = "candidate",
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="find adapters at any depth")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="stop at the first bad adapter")] = False,
    base: BaseOpt = None,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import PEFT adapter folders (as peft's save_pretrained writes them) as revisions, validated like an upload."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn  # noqa: PLC0415

    if alias not in ("candidate", "live"):
        raise typer.BadParameter(f"must be 'candidate' or 'live', got {alias!r}", param_hint="--alias")
    found = imports.find_adapters(paths, recursive=recursive)  # naming errors before loading the base
    imports.plan_refs(found, as_ref)
    b = _load_base(base)
    with _open() as reg, Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  console=err_console, disable=as_json, transient=True) as bar:
        task = bar.add_task("importing", total=len(found))

        def step(result: imports.ImportResult) -> None:
            bar.update(task, advance=1, description=f"importing {result.ref}")

        results = imports.import_adapters(reg, b, paths, as_ref=as_ref, alias=alias, recursive=recursive,
                                          strict=strict, creator=actor_name(actor), progress=step)
    failed = [r for r in results if r.status == "failed"]
    if as_json:
        _echo_json({"results": [r.to_dict() for r in results], "failed": len(failed)})
    else:
        table = Table(title=f"imported {len(results) - len(failed)} of {len(results)} adapter(s)")
        for col in ("source", "ref", "status", "revision", "ignored files", "error"):
            table.add_column(col, overflow="fold")
        for r in results:
            style = {"failed": "red", "unchanged": "dim"}.get(r.status, "green")
            table.add_row(escape(r.source), r.ref or "-", f"[{style}]{r.status}[/{style}]",
                          f"#{r.number}" if r.number else "-", escape(", ".join(r.ignored) or "-"),
                          escape(r.error or ""))
        console.print(table)
    if failed:
        err_console.print(f"error: {len(failed)} adapter(s) refused, nothing committed for them: "
                          + "; ".join(r.error if r.source in (r.error or "") else f"{r.source}: {r.error}"
                                      for r in failed), markup=False, highlight=False)
        raise typer.Exit(2)


@app.command("export")
@handle_errors
def export_(
    address: Annotated[str, typer.Argument(help="tenant/user/adapter[@alias|#N] (default: its live revision)")],
    directory: Annotated[str, typer.Argument(help="output folder")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="peft (peft, vLLM) or gguf (llama.cpp --lora)")] = "peft",
    force: Annotated[bool, typer.Option("--force", help="write into a folder that is not empty")] = False,
    base: BaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a revision as a PEFT folder or a llama.cpp GGUF LoRA file; never overwrites without --force."""
    if fmt not in FORMATS:
        raise typer.BadParameter(f"must be one of {', '.join(FORMATS)}, got {fmt!r}", param_hint="--format")
    check_target(directory, force=force)  # before the (slow) base load
    b = _load_base(base)
    with _open() as reg:
        out = export_revision(reg, b, address, directory, fmt=fmt, force=force)
    if as_json:
        _echo_json(out)
    else:
        console.print(f"exported [bold]{out['address']}[/bold] as {fmt} to {out['directory']}: "
                      f"{', '.join(out['files'])} (rank {out['rank']}, {out['modules']} modules)")
