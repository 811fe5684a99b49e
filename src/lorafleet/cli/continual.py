"""CLI: ``lorafleet memory show|export|capture|forget``, ``lorafleet forget``, ``lorafleet schedule set|show``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.table import Table

from lorafleet.cli.common import console, handle_errors, print_json, settings
from lorafleet.cli.serve import ADMIN_KEY_ENV
from lorafleet.continual.schedule import PolicyError, UpdatePolicy
from lorafleet.registry import InvalidArgumentError, InvalidNameError, Registry
from lorafleet.registry.memory import MemoryStore
from lorafleet.registry.names import check_segment

memory_app = typer.Typer(help="What lorafleet remembers of a user: conversations, feedback; forgetting.",
                         no_args_is_help=True)
schedule_app = typer.Typer(help="Scheduled personal updates from feedback (run by `lorafleet worker`).",
                           no_args_is_help=True)
JsonOpt = typer.Option(False, "--json", help="print JSON")


def _store():
    return MemoryStore(Registry.open_default(settings()))


def _user(spec: str) -> tuple[str, str]:
    parts = spec.split("/")
    if len(parts) != 2:
        raise InvalidNameError(f"expected tenant/user, got {spec!r}")
    return check_segment(parts[0], "tenant", spec), check_segment(parts[1], "user", spec)


@memory_app.command("show")
@handle_errors
def memory_show(user: str = typer.Argument(..., help="tenant/user"), as_json: bool = JsonOpt) -> None:
    """Counts and time spans of a user's captured conversations and feedback, per adapter, with settings."""
    info = _store().show(*_user(user))
    if as_json:
        print_json(info)
        return
    table = Table(title=f"memory of {info['user']}")
    for col in ("adapter", "capture", "schedule", "interactions", "feedback", "examples", "first", "last"):
        table.add_column(col)
    for name, a in info["adapters"].items():
        s = a["settings"] or {}
        table.add_row(name, "on" if s.get("capture") else "off", "on" if s.get("enabled") else "off",
                      str(a["interactions"]), str(a["feedback"]), str(a["examples"]), a["first"] or "",
                      a["last"] or "")
    console.print(table)


@memory_app.command("export")
@handle_errors
def memory_export(user: str = typer.Argument(..., help="tenant/user"),
                  out: Path | None = typer.Option(None, "--out", "-o", help="write JSON here (default: stdout)")) -> None:
    """Everything captured from a user (interactions and feedback) as JSON."""
    data = _store().export(*_user(user))
    if out is None:
        print_json(data)
        return
    out.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    console.print(f"wrote {len(data['interactions'])} interaction(s) and {len(data['feedback'])} feedback row(s) "
                  f"to {out}")


@memory_app.command("capture")
@handle_errors
def memory_capture(ref: str = typer.Argument(..., help="tenant/user/adapter"),
                   state: str = typer.Argument(..., help="on | off")) -> None:
    """Turn capture of an adapter's served conversations on or off (off by default)."""
    if state not in ("on", "off"):
        raise InvalidArgumentError(f"capture state must be 'on' or 'off', got {state!r}")
    settings = _store().configure(ref, capture=state == "on")
    console.print(f"capture for {ref}: {'on' if settings.capture else 'off'}")


def forget(user: str, *, yes: bool, server: str | None) -> None:
    tenant, name = _user(user)
    if not yes:
        typer.confirm(f"forget {tenant}/{name}: delete their conversations, feedback, adapters, revisions and blobs?",
                      abort=True)
    if server:
        import httpx  # noqa: PLC0415


        key = settings().admin_key
        if not key:
            raise InvalidArgumentError(f"--server needs an admin key in ${ADMIN_KEY_ENV}")
        r = httpx.delete(f"{server.rstrip('/')}/v1/users/{tenant}/{name}",
                         headers={"authorization": f"Bearer {key}"}, timeout=120)
        if r.status_code != 200:
            raise InvalidArgumentError(f"the server refused: {r.status_code} {r.text[:300]}")
        report = r.json()
    else:
        from lorafleet.api.forget import forget_user  # noqa: PLC0415 - defers fastapi (the api package)

        store = _store()
        report = forget_user(store.registry, tenant, name, actor=f"cli:{os.environ.get('USER', 'unknown')}",
                             memory=store)
    console.print(f"forgot {tenant}/{name}: {report['adapters']} adapter(s), {report['revisions']} revision(s), "
                  f"{report['interactions']} interaction(s), {report['feedback']} feedback row(s), "
                  f"{report['blobs_deleted']} blob(s) deleted ({report['blobs_shared_kept']} shared kept); audit "
                  f"tombstone #{report['audit_id']}")
    if not server:
        console.print("note: a running server keeps RAM/slot copies and its Tinker sessions until evicted; forget "
                      "through its API (--server URL) to purge them at once")


@memory_app.command("forget")
@handle_errors
def memory_forget(user: str = typer.Argument(..., help="tenant/user"),
                  yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
                  server: str | None = typer.Option(None, "--server", help="forget through a running server's "
                                                    "admin API (also purges its caches)")) -> None:
    """Delete everything of a user; the audit log keeps a tombstone only."""
    forget(user, yes=yes, server=server)


def _parse_gate(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise PolicyError(f"--gate takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            raise PolicyError(f"--gate {key}: {value!r} is not a number or true/false") from None
    return out


@schedule_app.command("set")
@handle_errors
def schedule_set(
    ref: str = typer.Argument(..., help="tenant/user/adapter"),
    min_examples: int | None = typer.Option(None, "--min-examples", help="retrain at >= N new examples"),
    every_hours: float | None = typer.Option(None, "--every-hours", help="...or every T hours (>= 1 new example)"),
    replay: float | None = typer.Option(None, "--replay", help="older examples replayed per new one"),
    holdout: float | None = typer.Option(None, "--holdout", help="share of feedback held out for evaluation"),
    steps: int | None = typer.Option(None, "--steps"),
    lr: float | None = typer.Option(None, "--lr"),
    method: str | None = typer.Option(None, "--method", help="auto | sft | dpo"),
    eval_persona: str | None = typer.Option(None, "--eval-persona", help="persona whose habit the feedback teaches"),
    gate: list[str] = typer.Option([], "--gate", help="GateConfig override KEY=VALUE (repeatable)"),
    capture: bool | None = typer.Option(None, "--capture/--no-capture", help="record served conversations"),
    enabled: bool | None = typer.Option(None, "--enable/--disable", help="scheduled updates on/off"),
    as_json: bool = JsonOpt,
) -> None:
    """Set an adapter's update policy (only the options given change), capture, and whether it runs."""

    store = _store()
    current = store.settings(ref).policy
    changes = {k: v for k, v in {"min_examples": min_examples, "every_hours": every_hours, "replay": replay,
                                  "holdout": holdout, "steps": steps, "lr": lr, "method": method,
                                  "eval_persona": eval_persona}.items() if v is not None}
    if gate:
        changes["gate"] = {**current.get("gate", {}), **_parse_gate(gate)}
    policy = UpdatePolicy.from_dict({**current, **changes}).to_dict()
    if enabled is None and not store.settings(ref).enabled and (changes or not current):
        enabled = True  # setting a policy turns the schedule on unless --disable
    settings = store.configure(ref, capture=capture, enabled=enabled, policy=policy)
    _print_settings(settings, as_json)


@schedule_app.command("show")
@handle_errors
def schedule_show(ref: str = typer.Argument(..., help="tenant/user/adapter"), as_json: bool = JsonOpt) -> None:
    """An adapter's policy, watermark, pending job and last result."""
    store = _store()
    Registry.open_default(settings()).get_adapter(ref)
    _print_settings(store.settings(ref), as_json)


def _print_settings(settings, as_json: bool) -> None:
    data = settings.to_dict()
    data["policy"] = UpdatePolicy.from_dict(settings.policy).to_dict()
    if as_json:
        print_json(data)
        return
    table = Table(title=f"schedule of {settings.ref}", show_header=False)
    for key in ("capture", "enabled", "watermark", "pending_job", "last_run_at"):
        table.add_row(key, str(data[key]))
    for key, value in data["policy"].items():
        table.add_row(f"policy.{key}", json.dumps(value))
    last = data["last_result"]
    if last:
        table.add_row("last result", f"{last.get('state')}: {last.get('reason') or last.get('error') or ''}")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(memory_app, name="memory")
    app.add_typer(schedule_app, name="schedule")

    @app.command("forget")
    @handle_errors
    def forget_cmd(user: str = typer.Argument(..., help="tenant/user"),
                   yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
                   server: str | None = typer.Option(None, "--server", help="through a running server's admin API")):
        """Forget a user (same as `lorafleet memory forget`)."""
        forget(user, yes=yes, server=server)
