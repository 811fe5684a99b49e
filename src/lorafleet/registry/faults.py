"""Crash injection for the reliability tests.

``LORAFLEET_FAULT=<point>`` makes the process SIGKILL itself when it reaches that point — the closest a test gets to
pulling the plug; ``<point>@<k>`` does so the k-th time this process reaches it (``@1`` is the default). Points of
the commit path: ``after_blob`` (blob durable, no metadata yet), ``before_db_commit`` (metadata written inside the
open transaction), ``after_db_commit`` (committed, not yet acknowledged to the caller). Elsewhere:
``blob_mid_write`` (half of a local blob's bytes written to its temp file: a checkpoint or commit being written),
``mid_step`` (inside a training step: gradients computed, the first user's optimizer updated, the others not).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

POINTS = ("blob_mid_write", "after_blob", "before_db_commit", "after_db_commit")  # every commit reaches these
TRAINING_POINTS = ("mid_step",)  # reached by a training worker only
ENV = "LORAFLEET_FAULT"

_hits: Counter[str] = Counter()


def checkpoint(point: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition("@")
    if name != point:
        return
    _hits[point] += 1
    if _hits[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
