"""Shared CLI plumbing: one console, quiet third-party logs, errors as one clear line and exit code 2."""

from __future__ import annotations

import functools
import json
import sys

import typer
from rich.console import Console
from rich.markup import escape

from lorafleet.registry.errors import RegistryError
from lorafleet.training.data import DataError

# Piped output (CI logs, transcripts) gets 120 columns instead of rich's 80, so tables stay readable.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean "bad input" — shown as a message, never a traceback."""
    from lorafleet.adapters.errors import AdapterError  # noqa: PLC0415 - defers torch
    from lorafleet.base.sources import BaseSourceError  # noqa: PLC0415 - defers torch/transformers/triton
    from lorafleet.training.trainer import TrainConfigError  # noqa: PLC0415 - defers torch

    errors: list[type[Exception]] = [AdapterError, BaseSourceError, DataError, TrainConfigError]
    try:

        errors.append(RegistryError)
    except ImportError:  # pragma: no cover - registry not installed
        pass
    return tuple(errors)


def handle_errors(fn):
    """Decorator for CLI commands: a user error prints ``error: ...`` on stderr and exits with code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except user_errors() as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))
