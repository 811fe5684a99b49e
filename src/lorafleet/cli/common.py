"""Shared CLI plumbing: one console, quiet third-party logs, errors as one clear line and exit code 2."""

from __future__ import annotations

import functools
import getpass
import json
import os
import sys

import click
import typer
from rich.console import Console
from rich.markup import escape

from lorafleet.config import Settings
from lorafleet.errors import LorafleetError

# Piped output (CI logs, transcripts) gets 120 columns instead of rich's 80, so tables stay readable.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def settings() -> Settings:
    """This process's settings: read from the environment once by the root command (``ctx.obj``); a command
    group mounted on another app (tests) reads them itself."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    if root is not None and isinstance(root.obj, Settings):
        return root.obj
    return Settings.from_env()


def actor_name(actor: str | None = None) -> str:
    """Who a command acts as in the audit log: ``--actor``, else ``cli:<OS user>``."""
    if actor:
        return actor
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


BaseDtypeOpt = typer.Option(None, "--base-dtype",
                            help="base precision: auto, native, int4, int8, bf16 or fp32 (default: $LORAFLEET_BASE_DTYPE "
                                 "or auto = native where the base can, else fp32; see docs/base_precision.md)")


def use_base_dtype(value: str | None) -> None:
    """``--base-dtype``: checked now (a clear error before anything happens), then in force for every base this
    process loads — and for the processes it starts — through ``$LORAFLEET_BASE_DTYPE``."""
    if value is None:
        return
    from lorafleet.base.precision import ENV_VAR, resolve_precision  # noqa: PLC0415 - defers torch

    os.environ[ENV_VAR] = resolve_precision(value)


def handle_errors(fn):
    """Decorator for CLI commands: a user error (:class:`LorafleetError`) prints ``error: ...`` on stderr and exits
    with its exit code (2)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LorafleetError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))
