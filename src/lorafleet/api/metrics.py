"""Prometheus text exposition: HTTP requests, tokens, tokens/s, queue depth, residency hits per tier,
adapter load latency, training jobs by state."""

from __future__ import annotations

import threading
import time
from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


class RequestCounter:
    """HTTP requests by route template and status (filled by a middleware), and when the server started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter = Counter()
        self.started = time.time()
        self._last = (time.monotonic(), 0)
        self.tokens_per_s = 0.0

    def add(self, route: str, status: int) -> None:
        with self._lock:
            self.counts[(route, str(status))] += 1

    def rate(self, tokens_total: int) -> float:
        """Tokens/s since the previous scrape (a gauge; Prometheus' rate() works on the counter too)."""
        now = time.monotonic()
        with self._lock:
            t0, n0 = self._last
            if now - t0 >= 1.0:
                self.tokens_per_s = (tokens_total - n0) / (now - t0)
                self._last = (now, tokens_total)
            return self.tokens_per_s


class _Collector:
    def __init__(self, service) -> None:
        self.service = service

    def collect(self):
        svc = self.service
        req = CounterMetricFamily("lorafleet_http_requests", "HTTP requests by route and status",
                                  labels=["route", "status"])
        for (route, status), n in sorted(svc.requests.counts.items()):
            req.add_metric([route, status], n)
        yield req
        engine = svc.engine
        if engine is not None:
            snap = engine.metrics_snapshot()
            c, g = snap["counters"], snap["gauges"]
            yield CounterMetricFamily("lorafleet_tokens_generated", "completion tokens generated",
                                      value=c["tokens_generated"])
            yield CounterMetricFamily("lorafleet_prompt_tokens", "prompt tokens processed", value=c["prompt_tokens"])
            yield GaugeMetricFamily("lorafleet_tokens_per_second", "completion tokens/s since the previous scrape",
                                    value=svc.requests.rate(c["tokens_generated"]))
            for name in ("requests_submitted", "requests_finished", "requests_failed", "requests_cancelled"):
                yield CounterMetricFamily(f"lorafleet_engine_{name}", f"engine {name.replace('_', ' ')}", value=c[name])
            hits = CounterMetricFamily("lorafleet_adapter_lookups", "adapter lookups by the tier that served them",
                                       labels=["tier"])
            hits.add_metric(["slot"], c["hits_slot"])
            hits.add_metric(["ram"], c["hits_ram"])
            hits.add_metric(["cold"], c["misses"])
            yield hits
            yield CounterMetricFamily("lorafleet_adapter_evictions", "adapters evicted from RAM",
                                      value=c["evictions_ram"])
            for gname, value in sorted(g.items()):
                yield GaugeMetricFamily(f"lorafleet_engine_{gname}", f"engine gauge {gname}", value=value)
            for hname in ("load_latency", "time_to_first_token", "queue_wait", "constraint_mask"):
                hist = engine.metrics.hist[hname]
                buckets, cum = [], 0
                for i, count in enumerate(hist.counts):
                    cum += count
                    bound = "+Inf" if i == len(hist.bounds) else str(hist.bounds[i])
                    buckets.append((bound, cum))
                yield HistogramMetricFamily(f"lorafleet_{hname}_seconds", f"{hname.replace('_', ' ')} (seconds)",
                                            buckets=buckets, sum_value=hist.total)
        jobs = GaugeMetricFamily("lorafleet_training_jobs", "training jobs by state", labels=["state"])
        for state, n in svc.jobs.counts().items():
            jobs.add_metric([state], n)
        yield jobs


def render(service) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(service))
    return generate_latest(registry)
