"""Configuration of the serving engine and of one request's sampling, validated at construction.

Every error names the field and the fix, e.g. ``EngineConfig.max_cached must be >= max_active (32), got 8``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

POLICIES = ("slru", "lru")


def _help(cls, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


def _int_at_least(obj, name: str, low: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"{type(obj).__name__}.{name} must be an integer >= {low}, got {value!r} ({_help(type(obj), name)})"
        )


@dataclass(frozen=True)
class EngineConfig:
    """How big the engine's batch, compute slots and adapter caches are, and how it schedules work."""

    max_batch: int = field(default=32, metadata={"help": "most sequences decoding together in one step"})
    max_active: int = field(
        default=32, metadata={"help": "compute slots: adapters routable in the running batch at once"}
    )
    max_cached: int = field(
        default=256,
        metadata={"help": "deserialized adapters kept in host RAM, including those in compute slots"},
    )
    max_rank: int = field(default=16, metadata={"help": "largest LoRA rank a compute slot holds (1..64)"})
    max_prefill_tokens: int = field(
        default=256,
        metadata={"help": "padded prompt tokens per prefill chunk; bounds how long decoding pauses for joiners"},
    )
    join_batch: int | None = field(
        default=None,
        metadata={"help": "admit joiners once this many rows are free (fewer prefill passes); None = max_batch // 4"},
    )
    join_wait_steps: int = field(
        default=4, metadata={"help": "...or once the oldest ready request has waited this many decode steps"}
    )
    lean_decode: bool = field(
        default=True,
        metadata={"help": "one-token steps take the lean forward (serving/lean.py) where the base's architecture "
                          "allows; False = always transformers' full forward (the reference)"},
    )
    max_seq_len: int | None = field(
        default=None,
        metadata={"help": "cap on prompt + completion tokens; None = the base's max_position_embeddings"},
    )
    load_workers: int = field(
        default=4, metadata={"help": "threads fetching cold adapters (I/O: concurrent fetches hide store latency)"}
    )
    parse_workers: int = field(
        default=1,
        metadata={"help": "of those, how many verify + parse at once (CPU: each takes a core from decoding)"},
    )
    max_inflight_loads: int = field(
        default=4, metadata={"help": "cold loads started but not finished, at most (each reserves a RAM entry)"}
    )
    cache_policy: str = field(
        default="slru",
        metadata={"help": "host-RAM eviction: 'slru' (segmented LRU, scan resistant) or 'lru'"},
    )
    protected_fraction: float = field(
        default=0.8, metadata={"help": "SLRU: share of max_cached reserved for adapters used at least twice"}
    )
    verify_digest: bool = field(
        default=True, metadata={"help": "check sha256(fetched bytes) == digest before parsing"}
    )
    device: str | None = field(
        default=None, metadata={"help": "device of the base (cpu, cuda, cuda:1); None = where the base already is"}
    )

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_active", "max_cached", "max_rank", "max_prefill_tokens", "load_workers",
                     "parse_workers", "max_inflight_loads"):
            _int_at_least(self, name, 1)
        if self.max_rank > 64:
            raise ValueError(f"EngineConfig.max_rank must be <= 64 (the largest LoRA rank), got {self.max_rank}")
        if self.max_cached < self.max_active:
            raise ValueError(
                f"EngineConfig.max_cached must be >= max_active ({self.max_active}), got {self.max_cached}: every "
                "adapter in a compute slot is also held in RAM; raise max_cached or lower max_active"
            )
        if self.max_seq_len is not None:
            _int_at_least(self, "max_seq_len", 2)
        if self.join_batch is not None:
            _int_at_least(self, "join_batch", 1)
        _int_at_least(self, "join_wait_steps", 0)
        if self.cache_policy not in POLICIES:
            raise ValueError(f"EngineConfig.cache_policy must be one of {POLICIES}, got {self.cache_policy!r}")
        if not isinstance(self.protected_fraction, (int, float)) or not 0.0 < self.protected_fraction < 1.0:
            raise ValueError(
                f"EngineConfig.protected_fraction must be in (0, 1), got {self.protected_fraction!r} "
                f"({_help(EngineConfig, 'protected_fraction')})"
            )
        if not isinstance(self.verify_digest, bool):
            raise ValueError(f"EngineConfig.verify_digest must be True or False, got {self.verify_digest!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(
                f"EngineConfig.device must be a device string such as 'cpu' or 'cuda', got {self.device!r}"
            )


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops (OpenAI-style fields)."""

    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; > 0 samples from softmax(logits / t)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: keep the smallest set of mass >= top_p"})
    max_tokens: int = field(default=64, metadata={"help": "most completion tokens to generate (>= 1)"})
    stop: tuple[str, ...] = field(
        default=(), metadata={"help": "strings that end the completion; the text returned stops before them"}
    )
    seed: int | None = field(
        default=None, metadata={"help": "seed of this request's own generator; same seed, same sample"}
    )
    ignore_eos: bool = field(default=False, metadata={"help": "keep generating past end-of-sequence (benchmarks)"})
    grammar: str | None = field(
        default=None,
        metadata={"help": "llguidance grammar the output must match (serving.constrain.json_grammar); None = free"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
            0.0 <= self.temperature <= 100.0
        ):
            raise ValueError(f"SamplingParams.temperature must be a number in [0, 100], got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        _int_at_least(self, "max_tokens", 1)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stop) > 16 or any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"SamplingParams.stop must be up to 16 non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"SamplingParams.seed must be a non-negative integer or None, got {self.seed!r}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise ValueError(f"SamplingParams.grammar must be a non-empty grammar string or None, got {self.grammar!r}")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
