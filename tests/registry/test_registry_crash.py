"""Crash atomicity: a committing process is SIGKILLed at injected points (``LORAFLEET_FAULT``) or at
a random moment; afterwards each revision is either wholly there or absent, and every
acknowledged revision verifies."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from registry_helpers import BASE, REF, blob, prov

from lorafleet.registry import Registry
from lorafleet.registry.faults import POINTS

COMMIT_SCRIPT = """
import sys
sys.path.insert(0, HERE)
from registry_helpers import blob
from lorafleet.registry import Provenance, Registry
db_url, blob_url, ref, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
reg = Registry(db_url, blob_url)
print("READY", flush=True)
for i in range(count):
    rev = reg.commit(ref, blob(b"crash payload %d" % i), Provenance(base_fingerprint="base-fp-1"))
    print("ACK", rev.number, rev.digest, flush=True)
""".replace("HERE", repr(os.path.dirname(os.path.abspath(__file__))))


def _spawn(db_url: str, blob_url: str, count: int, fault: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("LORAFLEET_FAULT", None)
    if fault:
        env["LORAFLEET_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-c", COMMIT_SCRIPT, db_url, blob_url, REF, str(count)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _acks(stdout: str) -> dict[int, str]:
    return {int(n): d for tag, n, d in (line.split() for line in stdout.splitlines() if line.startswith("ACK"))}


def _check_consistent(reg: Registry) -> list[int]:
    """Gapless numbers up to latest, every revision's blob verifies, aliases point at real revisions."""
    info = reg.get_adapter(REF)
    numbers = [r.number for r in reg.history(REF)]
    assert numbers == list(range(1, (info.latest or 0) + 1))
    for rev in reg.history(REF):
        assert reg.read_blob(rev.digest) is not None and rev.provenance.base_fingerprint == BASE
    for number in info.aliases.values():
        assert number in numbers
    if reg.engine.dialect.name == "sqlite":
        with reg.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    return numbers


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_injected_point_is_all_or_nothing(registry_url, blob_url, point):
    with Registry(registry_url, blob_url) as reg:
        first = reg.commit(REF, blob(b"acknowledged"), prov())

    proc = _spawn(registry_url, blob_url, 1, point)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert "ACK" not in out  # the caller never got an answer
    payload_digest = hashlib.sha256(blob(b"crash payload 0")).hexdigest()

    with Registry(registry_url, blob_url) as reg:
        numbers = _check_consistent(reg)
        assert reg.read_blob(first.digest) == blob(b"acknowledged")
        if point == "after_db_commit":
            assert numbers == [1, 2]  # committed but unacknowledged: whole revision present
            rev = reg.resolve(f"{REF}#2")
            assert rev.digest == payload_digest and reg.resolve(f"{REF}@candidate").number == 2
        else:
            assert numbers == [1]  # nothing half-visible
            assert reg.resolve(f"{REF}@candidate").number == 1
            assert not [e for e in reg.audit(REF) if e.to_number == 2]
            if point in ("after_blob", "before_db_commit"):
                # the blob was written first: it is an orphan, which gc removes
                assert reg.blobs.exists(payload_digest)
                assert reg.gc(grace_s=0).deleted_blobs == [payload_digest]
                assert not reg.blobs.exists(payload_digest)
        # the adapter keeps working with the next gapless number
        assert reg.commit(REF, blob(b"after the crash"), prov()).number == numbers[-1] + 1
        _check_consistent(reg)


def test_kill_at_random_moment_keeps_every_acknowledged_revision(registry_url, blob_url):
    proc = _spawn(registry_url, blob_url, 10_000, None)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    seen: list[str] = []
    deadline = time.time() + 30
    while len(seen) < 15 and time.time() < deadline:  # let it acknowledge a few commits, then pull the plug
        seen.append(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    acked = _acks("".join(seen) + out)
    assert len(acked) >= 10
    with Registry(registry_url, blob_url) as reg:
        numbers = _check_consistent(reg)
        assert set(acked) <= set(numbers)  # every acknowledged revision survived ...
        assert len(numbers) <= len(acked) + 1  # ... and at most the one in flight was added unacknowledged
        for number, digest in acked.items():
            assert reg.resolve(f"{REF}#{number}").digest == digest
        for rev in reg.history(REF):
            assert reg.read_blob(rev.digest) == blob(b"crash payload %d" % (rev.number - 1))
