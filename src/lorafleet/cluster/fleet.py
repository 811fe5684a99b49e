"""The fleet view: what every engine replica holds and how requests were routed to it.

Ray Serve routes a request to a replica but offers no way to ask every replica something. So each engine
replica *reports* every ``report_interval_s`` to one small board (a Serve deployment holding
:class:`FleetBoard`); the ingress reads the board for ``GET /v1/fleet/residency`` and ``/metrics``. A replica
that stops reporting (killed, drained) drops out of the view after ``stale_after_s``.

A report is a plain dict (see ``EngineReplica._report`` in ``ray_app``)::

    {"replica": "SERVE_REPLICA::lorafleet#EngineReplica#ab12", "routing": {"requests": 10, ...},
     "multiplexed": [digest, ...], "residency": engine.residency_snapshot(), "metrics": <raw metrics>}
"""

from __future__ import annotations

import time

from lorafleet.serving.metrics import Histogram, Metrics

# Per replica, counted by the replica: requests served, those naming an adapter, those whose adapter was already
# multiplexed on it when they arrived (the router's affinity held), leases loaded, leases that failed.
ROUTING_COUNTERS = ("requests", "adapter_requests", "affinity_hits", "lease_loads", "lease_failures")


def raw_metrics(metrics: Metrics) -> dict:
    """The mergeable state of an engine's metrics: counters, gauges, and histogram buckets (not quantiles)."""
    with metrics._lock:
        return {
            "counters": dict(metrics.counters),
            "gauges": dict(metrics.gauges),
            "hist": {name: {"counts": list(h.counts), "total": h.total, "n": h.n, "max": h.max}
                     for name, h in metrics.hist.items()},
        }


def merge_metrics(raws: list[dict]) -> Metrics:
    """One ``Metrics`` summing several replicas' (counters and gauges add, histogram buckets add)."""
    merged = Metrics()
    for raw in raws:
        for name, value in raw.get("counters", {}).items():
            if name in merged.counters:
                merged.counters[name] += value
        for name, value in raw.get("gauges", {}).items():
            merged.gauges[name] = merged.gauges.get(name, 0) + value
        for name, h in raw.get("hist", {}).items():
            target = merged.hist.setdefault(name, Histogram())
            if len(h["counts"]) != len(target.counts):
                continue  # different bucket bounds (another version): skip rather than mis-add
            target.counts = [a + b for a, b in zip(target.counts, h["counts"], strict=True)]
            target.total += h["total"]
            target.n += h["n"]
            target.max = max(target.max, h["max"])
    return merged


class FleetBoard:
    """Latest report per replica. One instance runs as the ``FleetBoard`` deployment (see ``ray_app``)."""

    def __init__(self, stale_after_s: float = 10.0) -> None:
        self.stale_after_s = stale_after_s
        self._reports: dict[str, tuple[float, dict]] = {}

    def report(self, replica: str, report: dict) -> None:
        self._reports[replica] = (time.time(), report)

    def reports(self) -> list[dict]:
        """Reports of the replicas heard from within ``stale_after_s``, each with its ``age_s``."""
        now = time.time()
        for replica, (t, _) in list(self._reports.items()):
            if now - t > self.stale_after_s:
                del self._reports[replica]
        return [{**r, "age_s": round(now - t, 3)} for t, r in sorted(self._reports.values(), key=lambda x: x[1]["replica"])]


def fleet_view(reports: list[dict]) -> dict:
    """``GET /v1/fleet/residency`` in cluster mode: per replica, and totals with the affinity rate."""
    totals = dict.fromkeys(ROUTING_COUNTERS, 0)
    replicas = []
    for r in reports:
        for name in ROUTING_COUNTERS:
            totals[name] += r["routing"].get(name, 0)
        res = r["residency"]
        replicas.append({
            "replica": r["replica"], "age_s": r.get("age_s"), "routing": r["routing"],
            "multiplexed": r["multiplexed"],
            "slots": res["slots"], "ram": res["ram"], "ram_bytes": res["ram_bytes"],
            "slot_table_bytes": res["slot_table_bytes"], "loading": res["loading"],
            "max_active": res["max_active"], "max_cached": res["max_cached"], "policy": res["policy"],
            "hit_rate": merge_metrics([r["metrics"]]).snapshot()["hit_rate"],
        })
    adapter_requests = totals["adapter_requests"]
    totals["affinity_rate"] = totals["affinity_hits"] / adapter_requests if adapter_requests else None
    totals["replicas"] = len(replicas)
    # The single-process keys too (engine.residency_snapshot's shape), over the whole fleet, each entry tagged
    # with its replica: what the dashboard and other single-engine readers expect.
    tagged = lambda key: [{**e, "replica": r["replica"]} for r in replicas for e in r[key]]  # noqa: E731
    return {"cluster": "ray", "replicas": replicas, "totals": totals,
            "slots": tagged("slots"), "ram": tagged("ram"),
            "loading": [d for r in replicas for d in r["loading"]],
            "queued": sum(rep["residency"].get("queued", 0) for rep in reports),
            "ram_bytes": sum(r["ram_bytes"] for r in replicas),
            "slot_table_bytes": sum(r["slot_table_bytes"] for r in replicas),
            "max_active": sum(r["max_active"] for r in replicas), "max_cached": sum(r["max_cached"] for r in replicas),
            "policy": replicas[0]["policy"] if replicas else None}
