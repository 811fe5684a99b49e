"""Result reports: machine facts and markdown tables written to docs/results/ (benchmarks and `lorafleet bench`)."""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path


def machine() -> str:
    """One line naming the machine, Python and torch (with its thread count) a result was measured on."""
    import torch  # noqa: PLC0415

    return (f"{platform.node()} · {platform.machine()} · {os.cpu_count()} CPU cores · python {platform.python_version()} · "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads) · {platform.platform()}")


def command_line() -> str:
    """The command that produced a result, as a user would type it."""
    if Path(sys.argv[0]).name == "lorafleet":
        return " ".join(["lorafleet", *sys.argv[1:]])
    return " ".join([Path(sys.executable).name, *sys.argv])


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def origin() -> dict:
    """When, where and by which command a result is being measured: kept in a result's JSON so a report redone
    from it later (``lorafleet bench render``) still names the run that measured it."""
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "command": command_line()}


def write_markdown(path: Path, title: str, sections: list[tuple[str, str]], notes: str = "",
                   measured: dict | None = None) -> Path:
    """Write a result file with date, machine, the exact command, then the sections (heading, text).

    ``measured`` = the :func:`origin` of a run whose saved numbers are being re-rendered: its date, machine and
    command head the file, followed by a line saying when and by which command the report was redone."""
    now = origin()
    head = measured or now
    body = [f"# {title}", "", f"- date: {head['date']}", f"- machine: {head['machine']}",
            f"- command: `{head['command']}`"]
    if measured:
        body.append(f"- report redone from the saved numbers on {now['date']}: `{now['command']}`")
    body.append("")
    for heading, text in sections:
        body += [f"## {heading}", "", text, ""]
    if notes:
        body += ["## Notes", "", notes, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(body))
    return path


PLOTS_MISSING = "plots need matplotlib, an optional extra: pip install 'lorafleet[plots]'"


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; matplotlib is the optional ``plots`` extra, imported only here.

    Raises ImportError with the install line when it is missing."""
    try:
        import matplotlib  # noqa: PLC0415 - optional extra, only for the reports that draw
    except ImportError as exc:
        raise ImportError(PLOTS_MISSING) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt

