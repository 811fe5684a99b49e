"""Shared benchmark plumbing: machine facts, result tables printed and written to docs/results/."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
console = Console(width=160)


def machine() -> str:
    cpus = os.cpu_count()
    import torch  # noqa: PLC0415

    return (f"{platform.node()} · {platform.machine()} · {cpus} CPU cores · python {platform.python_version()} · "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads) · {platform.platform()}")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def show(title: str, headers: list[str], rows: list[list]) -> None:
    table = Table(title=title)
    for h in headers:
        table.add_column(h)
    for row in rows:
        table.add_row(*[str(c) for c in row])
    console.print(table)


def write_result(name: str, title: str, sections: list[tuple[str, str]], notes: str = "") -> Path:
    """Write docs/results/<name>.md with date, machine, the exact command and the tables."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    body = [f"# {title}", "", f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: {machine()}", f"- command: `{command}`", ""]
    for heading, text in sections:
        body += [f"## {heading}", "", text, ""]
    if notes:
        body += ["## Notes", "", notes, ""]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(body))
    console.print(f"wrote {path}")
    return path


def run_child(args: list[str], env: dict | None = None, timeout: float = 3600) -> str:
    """Run a benchmark mode in a fresh process (clean peak RSS); returns its stdout."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{out.stderr[-3000:]}")
    return out.stdout
