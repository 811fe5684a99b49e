"""A local Ray instance running the lorafleet Serve application: 2 engine replicas over the tiny base, the
registry on a throwaway PostgreSQL, blobs in a shared temp directory. One per test module (startup 30–90 s,
depending on how busy the machine is)."""

from __future__ import annotations

import os
import time

import pytest
from _cluster import TENANT, adapter_refs, commit_live

from lorafleet.testing.pgtest import free_port

MATCHING_TIMEOUT_ENV = "RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S"


@pytest.fixture(scope="module")
def ray_cluster(pg_server, tmp_path_factory):
    pytest.importorskip("ray.serve")
    import ray

    from lorafleet.api.keys import KeyStore
    from lorafleet.base import load_base
    from lorafleet.cluster.config import ClusterConfig
    from lorafleet.cluster.launch import connect, deploy
    from lorafleet.registry import Registry
    from lorafleet.serving.params import EngineConfig

    tmp = tmp_path_factory.mktemp("cluster")
    db_url = pg_server.create_database(f"cluster_{os.getpid()}_{int(time.time())}")
    blob_url = str(tmp / "blobs")
    registry = Registry(db_url, blob_url)
    base = load_base("tiny")
    keys = KeyStore(registry)
    _, admin = keys.create(admin=True, name="admin")
    _, tenant = keys.create(tenant=TENANT, name="acme")
    digests = {ref: commit_live(registry, base, ref, seed=100 + i) for i, ref in enumerate(adapter_refs())}

    # 2 cores shared with other work: fractional CPUs, one torch thread, small caches; max_ongoing_requests=1 so
    # a burst for one adapter spills over to the other replica (the rollback test relies on that).
    engine = EngineConfig(max_batch=8, max_active=4, max_cached=28, max_rank=8)
    config = ClusterConfig(db_url=db_url, blob_url=blob_url, base="tiny", replicas=2, replica_cpus=0.5,
                           ingress_cpus=0.25, max_ongoing_requests=1, health_check_period_s=1.0,
                           report_interval_s=0.2, engine=engine)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Serve's router waits 1-2 s for a busy replica that has the adapter before trying the others; 0.1 s lets a
    # short burst for one adapter reach both replicas (the rollback test needs that). Read by the workers.
    saved = os.environ.get(MATCHING_TIMEOUT_ENV)
    os.environ[MATCHING_TIMEOUT_ENV] = "0.1"
    connect(num_cpus=4, object_store_mb=80)
    port = free_port()
    t0 = time.monotonic()
    deploy(config, host="127.0.0.1", port=port)

    class Cluster:
        pass

    c = Cluster()
    c.url, c.port, c.config = f"http://127.0.0.1:{port}", port, config
    c.registry, c.base, c.digests = registry, base, digests
    c.keys = {"admin": admin, "tenant": tenant}
    c.startup_s = time.monotonic() - t0
    try:
        yield c
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop(MATCHING_TIMEOUT_ENV, None)
        else:
            os.environ[MATCHING_TIMEOUT_ENV] = saved  # stops the whole local instance, Serve with it (serve.shutdown() drains: ~10 s more)
        registry.close()
