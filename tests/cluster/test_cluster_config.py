"""ClusterConfig validation, the serve-run config file, and merging replicas' metrics (no Ray cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.cluster.config import ClusterConfig, ClusterConfigError
from lorafleet.cluster.fleet import FleetBoard, fleet_view, merge_metrics, raw_metrics
from lorafleet.serving.metrics import Metrics
from lorafleet.serving.params import EngineConfig

PG = "postgresql+psycopg://lorafleet@db/lorafleet"
ROOT = Path(__file__).resolve().parents[2]

ERROR_CASES = [
    ({"db_url": "sqlite:///x.db"}, "must be a PostgreSQL URL"),
    ({"db_url": ""}, "must be a PostgreSQL URL"),
    ({"blob_url": ""}, "blob_url must name the shared blob store"),
    ({"replicas": 0}, r"replicas must be an integer >= 1"),
    ({"replicas": True}, r"replicas must be an integer >= 1"),
    ({"replica_cpus": -1}, r"replica_cpus must be a number >= 0"),
    ({"report_interval_s": 0}, r"report_interval_s must be a number > 0"),
    ({"adapters_per_replica": 300}, r"adapters_per_replica must be an integer in 1..224"),
    ({"engine": EngineConfig(max_active=8, max_cached=8)}, r"max_cached \(8\) must exceed engine.max_active"),
]


@pytest.mark.parametrize(("kwargs", "match"), ERROR_CASES)
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ClusterConfigError, match=match):
        ClusterConfig(**{"db_url": PG, "blob_url": "/shared/blobs", **kwargs})


def test_adapters_per_replica_defaults_to_what_the_engine_can_pin():
    cfg = ClusterConfig(db_url=PG, blob_url="/b", engine=EngineConfig(max_active=4, max_cached=28))
    assert cfg.adapters_per_replica == 24


def test_from_args_reads_engine_keys_flat_or_nested_and_refuses_unknown_ones(monkeypatch):
    monkeypatch.setenv("LORAFLEET_DB_URL", PG)
    monkeypatch.setenv("LORAFLEET_BLOB_URL", "s3://bucket/blobs")
    cfg = ClusterConfig.from_args({"replicas": 3, "max_batch": 8, "engine": {"max_active": 4, "max_cached": 12}})
    assert (cfg.replicas, cfg.engine.max_batch, cfg.engine.max_active, cfg.adapters_per_replica) == (3, 8, 4, 8)
    assert (cfg.db_url, cfg.blob_url) == (PG, "s3://bucket/blobs")
    # `serve run lorafleet.cluster.ray_app:app_builder replicas=3 replica_cpus=0.5 max_batch=8` passes strings
    cfg = ClusterConfig.from_args({"replicas": "3", "replica_cpus": "0.5", "max_batch": "8",
                                   "adapters_per_replica": "None"})
    assert (cfg.replicas, cfg.replica_cpus, cfg.engine.max_batch, cfg.adapters_per_replica) == (3, 0.5, 8, 224)
    with pytest.raises(ClusterConfigError, match=r"ClusterConfig.replicas must be an int, got 'two'"):
        ClusterConfig.from_args({"replicas": "two"})
    with pytest.raises(ClusterConfigError, match=r"unknown cluster setting\(s\) \['replicaz'\]"):
        ClusterConfig.from_args({"replicaz": 2})
    with pytest.raises(ClusterConfigError, match="EngineConfig.max_batch must be an integer >= 1"):
        ClusterConfig.from_args({"max_batch": 0})


def test_the_shipped_serve_config_builds_a_valid_cluster_config(monkeypatch):
    yaml = pytest.importorskip("yaml")
    schema = pytest.importorskip("ray.serve.schema")
    doc = yaml.safe_load((ROOT / "deploy" / "ray_serve.yaml").read_text())
    schema.ServeDeploySchema.model_validate(doc)  # what `serve run` / `serve deploy` accept
    (app,) = doc["applications"]
    assert app["import_path"] == "lorafleet.cluster.ray_app:app_builder"
    monkeypatch.setenv("LORAFLEET_DB_URL", PG)
    monkeypatch.setenv("LORAFLEET_BLOB_URL", "s3://bucket/blobs")
    cfg = ClusterConfig.from_args(app["args"])
    assert cfg.replicas == 2 and cfg.engine.max_cached == 256 and cfg.adapters_per_replica == 224


def test_merged_metrics_add_up_across_replicas():
    a, b = Metrics(), Metrics()
    a.inc("hits_slot", 3)
    b.inc("hits_slot", 4)
    b.inc("misses", 1)
    a.observe("load_latency", 0.01)
    b.observe("load_latency", 2.0)
    a.set_gauges(running=2)
    b.set_gauges(running=5)
    merged = merge_metrics([raw_metrics(a), raw_metrics(b)]).snapshot()
    assert merged["counters"]["hits_slot"] == 7 and merged["counters"]["misses"] == 1
    assert merged["gauges"]["running"] == 7
    assert merged["histograms"]["load_latency"]["count"] == 2
    assert merged["histograms"]["load_latency"]["max_s"] == 2.0
    assert merged["hit_rate"] == pytest.approx(7 / 8)


def test_fleet_view_totals_the_affinity_rate_and_drops_silent_replicas(monkeypatch):
    board = FleetBoard(stale_after_s=10)
    residency = {"slots": [], "ram": [], "ram_bytes": 0, "slot_table_bytes": 0, "loading": [], "max_active": 1,
                 "max_cached": 2, "policy": "slru"}

    def report(name, hits, adapter_requests):
        routing = {"requests": adapter_requests, "adapter_requests": adapter_requests, "affinity_hits": hits,
                   "lease_loads": 1, "lease_failures": 0}
        return {"replica": name, "routing": routing, "multiplexed": [], "residency": residency,
                "metrics": raw_metrics(Metrics())}

    board.report("r1", report("r1", 9, 10))
    board.report("r2", report("r2", 6, 10))
    view = fleet_view(board.reports())
    assert view["totals"]["replicas"] == 2
    assert view["totals"]["affinity_rate"] == pytest.approx(15 / 20)
    import lorafleet.cluster.fleet as fleet

    now = fleet.time.time()
    monkeypatch.setattr(fleet.time, "time", lambda: now + 11)
    assert board.reports() == []


CLI_ERRORS = [
    (["serve", "--cluster", "swarm"], {}, "must be 'local' or 'ray'"),
    (["serve", "--cluster", "ray"], {"LORAFLEET_DB_URL": "sqlite:///x.db"}, "must be a PostgreSQL URL"),
    (["serve", "--cluster", "ray", "--max-active", "32", "--max-cached", "32"], {"LORAFLEET_DB_URL": PG},
     r"must exceed engine.max_active"),
]


@pytest.mark.parametrize(("argv", "env", "match"), CLI_ERRORS)
def test_serve_cluster_refuses_bad_settings_before_starting_anything(argv, env, match, monkeypatch, tmp_path):
    import re

    from typer.testing import CliRunner

    from lorafleet.cli import app

    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    monkeypatch.delenv("LORAFLEET_DB_URL", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert re.search(match, " ".join(result.output.replace("│", " ").split())), result.output
    assert not (tmp_path / "registry.db").exists()  # nothing was opened or created
