"""Scale down and scale up (issue #11): the two `lorafleet bench` commands, for `make bench` / run_all.

    python benchmarks/scale.py            # both on the real bases; writes docs/results/scale_down.md, scale_up.md + PNGs
    python benchmarks/scale.py --quick    # tiny-model smoke runs (written to a temp dir)

The logic lives in lorafleet.bench.scale (see docs/scale.md); this only runs the commands.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def main() -> int:
    from lorafleet.cli import app  # noqa: PLC0415

    quick = "--quick" in sys.argv
    out = tempfile.mkdtemp(prefix="scale-") if quick else str(RESULTS)
    for command in ("scale-down", "scale-up"):
        args = ["bench", command, "--out", out, *(["--quick"] if quick else [])]
        try:
            app(args, standalone_mode=False)
        except SystemExit as exc:  # typer.Exit from an error
            if exc.code:
                return int(exc.code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
