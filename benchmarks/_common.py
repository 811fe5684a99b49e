"""Shared benchmark plumbing: machine facts, result tables printed and written to docs/results/."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorafleet.results import machine, markdown_table, write_markdown  # noqa: F401  (re-exported for benchmarks)

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
console = Console(width=160)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def show(title: str, headers: list[str], rows: list[list]) -> None:
    table = Table(title=title)
    for h in headers:
        table.add_column(h)
    for row in rows:
        table.add_row(*[str(c) for c in row])
    console.print(table)


def write_result(name: str, title: str, sections: list[tuple[str, str]], notes: str = "") -> Path:
    """Write docs/results/<name>.md with date, machine, the exact command and the tables."""
    path = write_markdown(RESULTS / f"{name}.md", title, sections, notes)
    console.print(f"wrote {path}")
    return path


def run_child(args: list[str], env: dict | None = None, timeout: float = 3600) -> str:
    """Run a benchmark mode in a fresh process (clean peak RSS); returns its stdout."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{out.stderr[-3000:]}")
    return out.stdout
