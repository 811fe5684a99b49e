"""Configuration of the Ray Serve application, validated at construction.

One ``ClusterConfig`` describes the whole application: how many engine replicas, what each holds, where the
shared registry and blob store are. It is what ``lorafleet serve --cluster ray`` builds from its flags and what
the ``args:`` of a ``serve run`` config file are parsed into (:meth:`ClusterConfig.from_args`).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from lorafleet.config import Settings
from lorafleet.errors import LorafleetError
from lorafleet.serving.params import EngineConfig


class ClusterConfigError(LorafleetError, ValueError):
    """A cluster setting is invalid; the message names it and the fix."""


def _coerce(cls, args: dict[str, Any]) -> dict[str, Any]:
    """``serve run module:app_builder key=value`` passes strings: turn them into the fields' types."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in args.items():
        hint = hints.get(key)
        if not isinstance(value, str) or hint is None or hint is str:
            out[key] = value
            continue
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if type(None) in options and value.lower() in ("none", "null", ""):
            out[key] = None
            continue
        for kind in (bool, int, float):
            if kind in options:
                try:
                    out[key] = {"true": True, "false": False}[value.lower()] if kind is bool else kind(value)
                except (KeyError, ValueError):
                    article = "an" if kind is int else "a"
                    raise ClusterConfigError(f"{cls.__name__}.{key} must be {article} {kind.__name__}, got {value!r}"
                                             ) from None
                break
        else:
            out[key] = value
    return out


def _help(name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(ClusterConfig) if f.name == name)


@dataclass(frozen=True)
class ClusterConfig:
    """The Ray Serve application: N engine replicas behind one ingress, all over one shared registry."""

    db_url: str = field(metadata={"help": "the shared registry: a postgresql+psycopg:// URL every replica reaches"})
    blob_url: str = field(metadata={"help": "the shared blob store: s3://bucket/prefix, or a directory every node sees"})
    base: str | None = field(default=None, metadata={"help": "base name or path (None = $LORAFLEET_BASE / default)"})
    base_dtype: str | None = field(default=None, metadata={
        "help": "base precision for every replica (None = $LORAFLEET_BASE_DTYPE of the launching process / auto)"})
    replicas: int = field(default=2, metadata={"help": "engine replicas, each holding the base and its own caches"})
    replica_cpus: float = field(default=1.0, metadata={"help": "CPUs Ray reserves per engine replica (may be < 1)"})
    replica_gpus: float = field(default=0.0, metadata={"help": "GPUs Ray reserves per engine replica"})
    ingress_replicas: int = field(default=1, metadata={"help": "ingress replicas (auth, name resolution, HTTP)"})
    ingress_cpus: float = field(default=0.5, metadata={"help": "CPUs Ray reserves per ingress replica"})
    max_ongoing_requests: int = field(
        default=32, metadata={"help": "requests one engine replica accepts at once; the router spills past it"})
    adapters_per_replica: int | None = field(
        default=None, metadata={"help": "multiplexed adapters per replica (pinned in its RAM); None = "
                                        "engine.max_cached - engine.max_active, all the engine can pin"})
    torch_threads: int = field(default=1, metadata={"help": "torch threads per replica process"})
    health_check_period_s: float = field(
        default=5.0, metadata={"help": "how often Serve checks a replica; a dead one is replaced after it fails"})
    report_interval_s: float = field(
        default=0.5, metadata={"help": "how often a replica reports its residency and counters to the fleet board"})
    load_timeout_s: float = field(
        default=120.0, metadata={"help": "how long a replica waits for an adapter to become resident"})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "each replica's engine"})
    metrics_public: bool = field(default=False, metadata={"help": "serve /metrics without a key (default: admin key)"})

    def __post_init__(self) -> None:
        if not isinstance(self.db_url, str) or not self.db_url.startswith("postgresql"):
            raise ClusterConfigError(
                f"ClusterConfig.db_url must be a PostgreSQL URL (postgresql+psycopg://user@host/db), got "
                f"{self.db_url!r}: every replica must see one catalog, and SQLite is one machine's file; set "
                "$LORAFLEET_DB_URL")
        if not isinstance(self.blob_url, str) or not self.blob_url:
            raise ClusterConfigError(f"ClusterConfig.blob_url must name the shared blob store, got {self.blob_url!r}")
        for name in ("replicas", "ingress_replicas", "max_ongoing_requests", "torch_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ClusterConfigError(f"ClusterConfig.{name} must be an integer >= 1, got {value!r} ({_help(name)})")
        for name in ("replica_cpus", "replica_gpus", "ingress_cpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ClusterConfigError(f"ClusterConfig.{name} must be a number >= 0, got {value!r} ({_help(name)})")
        for name in ("health_check_period_s", "report_interval_s", "load_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ClusterConfigError(f"ClusterConfig.{name} must be a number > 0, got {value!r}")
        if not isinstance(self.engine, EngineConfig):
            raise ClusterConfigError(f"ClusterConfig.engine must be an EngineConfig, got {type(self.engine).__name__}")
        pinnable = self.engine.max_cached - self.engine.max_active
        if self.adapters_per_replica is None:
            if pinnable < 1:
                raise ClusterConfigError(
                    f"engine.max_cached ({self.engine.max_cached}) must exceed engine.max_active "
                    f"({self.engine.max_active}): a replica pins its multiplexed adapters in RAM and can pin at most "
                    "max_cached - max_active of them")
            object.__setattr__(self, "adapters_per_replica", pinnable)
        value = self.adapters_per_replica
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max(pinnable, 0):
            raise ClusterConfigError(
                f"ClusterConfig.adapters_per_replica must be an integer in 1..{pinnable} (engine.max_cached - "
                f"engine.max_active, what a replica can pin), got {value!r}")

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> ClusterConfig:
        """Parse the ``args:`` of a ``serve run`` config (flat keys; engine keys may sit under ``engine:``).

        ``db_url`` / ``blob_url`` default to ``$LORAFLEET_DB_URL`` / ``$LORAFLEET_BLOB_URL``.
        """
        args = dict(args or {})
        engine_args = dict(args.pop("engine", None) or {})
        engine_names = {f.name for f in fields(EngineConfig)}
        own = {f.name for f in fields(cls)} - {"engine"}
        for key in list(args):
            if key in engine_names and key not in own:
                engine_args[key] = args.pop(key)
        unknown = sorted(set(args) - own)
        if unknown:
            raise ClusterConfigError(f"unknown cluster setting(s) {unknown}; known: {sorted(own | engine_names)}")
        bad = sorted(set(engine_args) - engine_names)
        if bad:
            raise ClusterConfigError(f"unknown engine setting(s) {bad}; known: {sorted(engine_names)}")
        settings = Settings.from_env()
        args.setdefault("db_url", settings.db_url or "")
        args.setdefault("blob_url", settings.blob_url or "")
        args, engine_args = _coerce(cls, args), _coerce(EngineConfig, engine_args)
        try:
            engine = EngineConfig(**engine_args)
        except (TypeError, ValueError) as exc:
            raise ClusterConfigError(str(exc)) from None
        return cls(engine=engine, **args)
