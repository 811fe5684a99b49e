"""Shared CLI plumbing: one console, quiet third-party logs, errors as one clear line and exit code 2."""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings

import typer
from rich.console import Console
from rich.markup import escape

# Piped output (CI logs, transcripts) gets 120 columns instead of rich's 80, so tables stay readable.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def quiet_libraries() -> None:
    """transformers' progress bars and deprecation chatter are noise for a CLI user."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    try:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean "bad input" — shown as a message, never a traceback."""
    from lorafleet.adapters.errors import AdapterError  # noqa: PLC0415
    from lorafleet.base.precision import BasePrecisionError  # noqa: PLC0415
    from lorafleet.base.sources import BaseSourceError  # noqa: PLC0415
    from lorafleet.training.data import DataError  # noqa: PLC0415
    from lorafleet.training.trainer import TrainConfigError  # noqa: PLC0415

    errors: list[type[Exception]] = [AdapterError, BasePrecisionError, BaseSourceError, DataError, TrainConfigError]
    try:
        from lorafleet.registry.errors import RegistryError  # noqa: PLC0415

        errors.append(RegistryError)
    except ImportError:  # pragma: no cover - registry not installed
        pass
    return tuple(errors)


BaseDtypeOpt = typer.Option(None, "--base-dtype",
                            help="base precision: native, int4, int8, bf16 or fp32 (default: $LORAFLEET_BASE_DTYPE "
                                 "or fp32; see docs/base_precision.md)")


def use_base_dtype(value: str | None) -> None:
    """``--base-dtype``: checked now (a clear error before anything happens), then in force for every base this
    process loads — and for the processes it starts — through ``$LORAFLEET_BASE_DTYPE``."""
    if value is None:
        return
    from lorafleet.base.precision import ENV_VAR, resolve_precision  # noqa: PLC0415

    os.environ[ENV_VAR] = resolve_precision(value)


def handle_errors(fn):
    """Decorator for CLI commands: a user error prints ``error: ...`` on stderr and exits with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except user_errors() as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # one line, never wrapped
            raise typer.Exit(2) from None

    return wrapper


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))
