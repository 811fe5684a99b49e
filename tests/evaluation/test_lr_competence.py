"""``benchmarks/lr_competence.py``: the lr sweep end to end on the tiny model (train per lr, engine evaluation with
the probe, the gate's verdict per adapter), and its bad input refused before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lr_competence.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_quick_sweep_reports_each_lr_with_probe_and_gate(tmp_path):
    out = _run("--quick", "--lrs", "1e-2,1e-4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for lr in ("0.01", "0.0001"):  # a line per lr: answers checked (2 personas x 2 prompts), a verdict per adapter
        assert f"lr {lr}: adherence " in text and "/4, probe retention " in text
        assert "the gate would promote " in text.split(f"lr {lr}: adherence")[1].splitlines()[0]
    assert "/2 (refused: " in text and "quick run: nothing written" in text


@pytest.mark.parametrize(("args", "match"), [
    (["--lrs", "fast"], "comma list of numbers"), (["--lrs", "0,1e-3"], "positive"), (["--seeds", "0"], "at least 1"),
])
def test_bad_input_exits_2_before_any_work(tmp_path, args, match):
    out = _run("--quick", *args, cwd=tmp_path)
    assert out.returncode == 2 and match in out.stderr, out.stderr[-1000:]
    assert "base " not in out.stdout  # nothing loaded
