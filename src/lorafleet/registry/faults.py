"""Crash injection for the reliability tests.

``LORAFLEET_FAULT=<point>`` makes the process SIGKILL itself when it reaches that point of the
commit path — the closest a test gets to pulling the plug. Points: ``after_blob`` (blob durable,
no metadata yet), ``before_db_commit`` (metadata written inside the open transaction),
``after_db_commit`` (committed, not yet acknowledged to the caller).
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_blob", "before_db_commit", "after_db_commit")


def checkpoint(point: str) -> None:
    if os.environ.get("LORAFLEET_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
