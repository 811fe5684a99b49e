"""Process-wide settings: where lorafleet keeps its data.

The data dir holds the base-weight cache, the embedded registry (SQLite), the blob store and
job checkpoints. It is ``$LORAFLEET_HOME`` when set, else ``~/.lorafleet``.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """Return the data dir, creating it if needed."""
    root = Path(os.environ.get("LORAFLEET_HOME", Path.home() / ".lorafleet")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
