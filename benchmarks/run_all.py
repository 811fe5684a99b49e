"""`make bench`: run every benchmark script in this folder in turn (full size, real base).

    python benchmarks/run_all.py            # all of them
    python benchmarks/run_all.py training   # only scripts whose name contains "training"
    python benchmarks/run_all.py --quick    # each in its --quick mode (tiny model smoke run)

Each script prints its table and writes docs/results/<name>.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    scripts = sorted(p for p in HERE.glob("*.py") if not p.name.startswith(("_", "run_all")))
    if args:
        scripts = [p for p in scripts if any(a in p.stem for a in args)]
    failed = []
    for script in scripts:
        print(f"== {script.name}{' --quick' if quick else ''}", flush=True)
        rc = subprocess.call([sys.executable, str(script), *(["--quick"] if quick else [])])
        if rc != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
