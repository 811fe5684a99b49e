"""Counters and latency histograms of the engine and its residency; thread-safe, cheap to update."""

from __future__ import annotations

import bisect
import threading

# Upper bounds in seconds (the last bucket is open): 0.25 ms .. 10 s, roughly x2 apart.
LATENCY_BOUNDS = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

COUNTERS = (
    "requests_submitted",
    "requests_finished",
    "requests_failed",
    "requests_cancelled",
    "nonfinite_rows",  # rows failed because their logits became NaN/Inf (an adapter that overflows)
    "prompt_tokens",
    "tokens_generated",
    "decode_steps",
    "prefill_chunks",
    "hits_slot",  # adapter already in a compute slot
    "hits_ram",  # in host RAM, copied into a slot
    "misses",  # cold: fetched from the blob source (or joined a load already running)
    "coalesced",  # misses that joined a load already running for the same digest
    "prefetches",
    "loads_ok",
    "load_failures",
    "evictions_ram",
    "purges",
    "evictions_slot",
    "slot_loads",
)


class Histogram:
    """Fixed-bucket latency histogram (Prometheus style): counts per bucket, sum, count, max."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.n = 0
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.n += 1
        self.max = max(self.max, seconds)

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (the max for the open bucket)."""
        if self.n == 0:
            return None
        rank, seen = q * self.n, 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return self.bounds[i] if i < len(self.bounds) else self.max
        return self.max

    def snapshot(self) -> dict:
        return {
            "count": self.n,
            "sum_s": self.total,
            "mean_s": self.total / self.n if self.n else None,
            "p50_s": self.quantile(0.5),
            "p99_s": self.quantile(0.99),
            "max_s": self.max if self.n else None,
            "buckets": {("+inf" if i == len(self.bounds) else f"<={self.bounds[i]}"): c
                        for i, c in enumerate(self.counts) if c},
        }


class Metrics:
    """The engine's counters, gauges and histograms. ``snapshot()`` is a plain dict, safe to serialize."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.gauges: dict[str, int] = {}
        self.hist = {
            "load_latency": Histogram(),  # cold: fetch + verify + parse + validate (loader thread)
            "slot_load_latency": Histogram(),  # RAM -> compute slot copy
            "decode_step": Histogram(),
            "prefill_chunk": Histogram(),
            "queue_wait": Histogram(),  # submit -> admitted into the batch
            "time_to_first_token": Histogram(),
            "constraint_mask": Histogram(),  # per step with constrained rows: their grammar masks, applied
        }

    def inc(self, name: str, by: int = 1) -> None:
        with self._lock:
            self.counters[name] += by

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self.hist[name].observe(seconds)

    def set_gauges(self, **values: int) -> None:
        with self._lock:
            self.gauges.update(values)

    def snapshot(self) -> dict:
        with self._lock:
            c = dict(self.counters)
            lookups = c["hits_slot"] + c["hits_ram"] + c["misses"]
            return {
                "counters": c,
                "gauges": dict(self.gauges),
                "hit_rate": (c["hits_slot"] + c["hits_ram"]) / lookups if lookups else None,
                "histograms": {k: h.snapshot() for k, h in self.hist.items()},
            }
