"""The newest published ``tinker`` SDK, in its own process, against a lorafleet server on loopback.

The rest of the Tinker tests drive the pinned SDK (``tinker==0.38.0`` in pyproject.toml) in process. This one
installs :data:`TINKER_NEWEST` from PyPI on first use into its own folder (``pip install --no-deps --target``,
plus any requirement the project's environment lacks; cached under ``~/.cache/lorafleet/``, so later runs cost
nothing) and runs ``tinker_sdk_script.py`` with only that folder on ``PYTHONPATH``: the SFT loop, the RL losses,
a sampler checkpoint with user_metadata, a sample, the listings and the session search.

Where pip cannot reach PyPI the test is skipped with the reason — except under ``CI`` (``.ci/run`` sets CI=1),
where that is a failure, as for PostgreSQL and chromium.

Newest on PyPI on 2026-12-07: 0.38.0 (the same as the pin; no 0.39 is published). When a newer SDK appears,
set :data:`TINKER_NEWEST` to it (``python -m pip index versions tinker``) and run this test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from lorafleet.serving.params import SamplingParams

TINKER_NEWEST = "0.38.0"
SCRIPT = Path(__file__).with_name("tinker_sdk_script.py")
# pip's messages when it cannot reach the index (as opposed to a version that does not exist, or a broken wheel)
OFFLINE = ("NewConnectionError", "Failed to establish a new connection", "Network is unreachable",
           "Temporary failure in name resolution", "ConnectTimeoutError", "Max retries exceeded", "ProxyError")


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorafleet"


def _pip(*args: str) -> subprocess.CompletedProcess:
    # few retries, short timeouts: an unreachable PyPI is known in seconds, not after pip's default back-off
    return subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--retries", "2", "--timeout", "30", *args], capture_output=True, text=True, timeout=600)


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but the newest tinker SDK cannot be installed: {why}", pytrace=False)
    pytest.skip(f"the newest tinker SDK ({TINKER_NEWEST}) cannot be installed from PyPI here: {why}")


def _missing_requirements(folder: Path) -> list[str]:
    """The SDK's requirements (no extras) that this environment does not satisfy."""
    dist = next(metadata.distributions(path=[str(folder)], name="tinker"))
    missing = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement (torch, aiohttp): not needed
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(str(req))
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            missing.append(str(req))
    return missing


@pytest.fixture(scope="session")
def newest_sdk() -> Path:
    """A folder holding ``tinker==TINKER_NEWEST`` (and requirements this environment lacks), installed once."""
    folder = _cache_root() / f"tinker-{TINKER_NEWEST}"
    if (folder / ".complete").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    done = _pip("--no-deps", "--target", str(tmp), f"tinker=={TINKER_NEWEST}")
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = done.stderr.strip().splitlines()
        offline = [line.strip() for line in lines if any(marker in line for marker in OFFLINE)]
        if offline:
            _unavailable(f"{offline[-1][:300]} ({lines[-1].strip()})")
        pytest.fail(f"pip could not install tinker=={TINKER_NEWEST}:\n{done.stderr[-2000:]}", pytrace=False)
    missing = _missing_requirements(tmp)
    if missing:  # pure-python requirements new in this SDK: into the same folder, without touching the venv
        more = _pip("--target", str(tmp), *missing)
        if more.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.fail(f"pip could not install the newest SDK's requirements {missing}:\n{more.stderr[-2000:]}",
                        pytrace=False)
    (tmp / ".complete").write_text(json.dumps({"tinker": TINKER_NEWEST, "extra_requirements": missing}))
    if folder.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(folder)
    return folder


def test_newest_sdk_trains_samples_and_searches(server, tk, newest_sdk):
    tok = server.base.tokenizer
    rows = [tok.encode(t) for t in ("the cat sat on the mat", "hello world, hello lorafleet")]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TINKER_BASE_URL", "TINKER_API_KEY")}
    env |= {"PYTHONPATH": str(newest_sdk), "TINKER_TELEMETRY": "0", "PYTHONNOUSERSITE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), server.url, "tml-" + server.keys["acme"], server.base.name,
                           json.dumps(rows)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["version"] == TINKER_NEWEST and Path(out["module"]).is_relative_to(newest_sdk)  # the SDK under test
    assert out["curve"][-1] < out["curve"][0]  # SFT trains
    for loss_fn, (got, want) in out["rl"].items():
        assert got == pytest.approx(want, abs=2e-4), loss_fn
    rev = server.registry.resolve("acme/alice/newest-sdk#1")  # the sampler checkpoint is a registry revision
    assert rev.provenance.hyperparams["tinker_path"] == out["path"]
    assert rev.provenance.hyperparams["loss"] == ["cispo", "cross_entropy", "dro", "ppo"]
    assert rev.provenance.hyperparams["user_metadata"] == {"sdk": TINKER_NEWEST}
    assert out["checkpoint_metadata"]["sdk"] == TINKER_NEWEST
    assert out["checkpoint_metadata"]["lorafleet_revision"] == str(rev.number)
    direct = server.engine.generate([out["prompt"]], [rev.digest], SamplingParams(max_tokens=5))[0]
    assert out["tokens"] == direct.token_ids  # the SDK's greedy sample = the engine with that revision
    assert out["sessions"] == [out["session_of_run"]]
