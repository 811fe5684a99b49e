"""Process-wide settings: where lorafleet keeps its data.

The data dir holds the base-weight cache, the embedded registry (SQLite), the blob store and
job checkpoints. It is ``$LORAFLEET_HOME`` when set, else ``~/.lorafleet``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path


def data_dir() -> Path:
    """Return the data dir, creating it if needed."""
    root = Path(os.environ.get("LORAFLEET_HOME", Path.home() / ".lorafleet")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def quiet_libraries() -> None:
    """transformers' progress bars and deprecation chatter are noise for a CLI user."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    try:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415 - transformers is slow to import

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
