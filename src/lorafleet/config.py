"""Process-wide settings: one :class:`Settings`, read from the environment once and passed down.

``lorafleet config`` prints the effective settings (``--json``). The data dir holds the base-weight cache, the
embedded registry (SQLite), the blob store and job checkpoints: ``$LORAFLEET_HOME``, else ``~/.lorafleet``.
Test-only hooks (``LORAFLEET_FAULT``, ``LORAFLEET_WORKER_FAULT``, ``LORAFLEET_PG_BIN``) and third-party variables
(``TRITON_INTERPRET``, ``HF_HUB_OFFLINE``) are not settings.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_HOME = Path("~/.lorafleet")


def _setting(env: str, help: str, default=None, *, secret: bool = False):
    return field(default=default, metadata={"env": env, "help": help, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """The effective configuration of one process. Build it with :meth:`from_env`, then pass it down."""

    home: Path = _setting("LORAFLEET_HOME", "data dir: base cache, SQLite registry, blobs, checkpoints",
                          DEFAULT_HOME)
    base: str | None = _setting("LORAFLEET_BASE", "base model name or path (unset: smollm2-135m-instruct)")
    db_url: str | None = _setting("LORAFLEET_DB_URL", "registry database URL (unset: sqlite:///<home>/registry.db)")
    blob_url: str | None = _setting("LORAFLEET_BLOB_URL", "blob store: a directory or s3://bucket/prefix "
                                    "(unset: <home>/blobs)")
    s3_endpoint: str | None = _setting("LORAFLEET_S3_ENDPOINT", "endpoint URL for an S3-compatible blob store")
    admin_key: str | None = _setting("LORAFLEET_ADMIN_KEY", "admin API key `serve` makes sure exists; "
                                     "`forget --server` sends it", secret=True)
    ray_address: str | None = _setting("RAY_ADDRESS", "Ray cluster to join for `serve --cluster ray` "
                                       "(unset: start a local one)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``); an empty variable counts as unset."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"]) or None
            if raw is not None:
                values[f.name] = Path(raw) if f.name == "home" else raw
        return cls(**values)

    @property
    def data_dir(self) -> Path:
        """The data dir, created if needed."""
        root = self.home.expanduser()
        root.mkdir(parents=True, exist_ok=True)
        return root

    @property
    def registry_db_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'registry.db'}"

    @property
    def registry_blob_url(self) -> str:
        return self.blob_url or str(self.data_dir / "blobs")

    def describe(self, *, reveal: bool = False) -> list[dict]:
        """One row per setting: name, variable, value (secrets masked unless ``reveal``), source and help."""
        rows = []
        for f in fields(self):
            value = getattr(self, f.name)
            is_default = value == f.default
            if f.metadata["secret"] and value is not None and not reveal:
                value = "***"
            shown = None if value is None else str(value.expanduser() if isinstance(value, Path) else value)
            rows.append({"name": f.name, "env": f.metadata["env"], "value": shown,
                         "source": "default" if is_default else "environment", "help": f.metadata["help"]})
        return rows


def data_dir(settings: Settings | None = None) -> Path:
    """Return the data dir of ``settings`` (default: from the environment), creating it if needed."""
    return (settings or Settings.from_env()).data_dir


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
