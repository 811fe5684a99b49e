"""Starting the Ray Serve application: ``lorafleet serve --cluster ray``, tests and benchmarks.

``connect`` joins a running Ray cluster (``address``, or ``$RAY_ADDRESS``) or starts a small local one;
``deploy`` starts Serve's HTTP proxy and runs the application. ``serve run deploy/ray_serve.yaml`` is the
other way in (see docs/cluster.md); both end in :func:`lorafleet.cluster.ray_app.build_app`.
"""

from __future__ import annotations

import os

from lorafleet.cluster.config import ClusterConfig, ClusterConfigError
from lorafleet.config import Settings

INSTALL_HINT = "Ray Serve is not installed: pip install 'lorafleet[ray]' (ray[serve]==2.60.0)"


def require_ray() -> None:
    try:
        import ray  # noqa: F401, PLC0415
        from ray import serve  # noqa: F401, PLC0415
    except ImportError as exc:
        raise ClusterConfigError(f"{INSTALL_HINT} ({exc})") from None


def connect(address: str | None = None, *, num_cpus: float | None = None, object_store_mb: int = 128,
            quiet: bool = True) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), else start a local Ray instance (no dashboard, small object store)."""
    require_ray()
    import ray  # noqa: PLC0415

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    address = address or Settings.from_env().ray_address
    if address:
        ray.init(address=address, log_to_driver=not quiet)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_mb * 1024 * 1024,
             log_to_driver=not quiet)


def required_cpus(config: ClusterConfig) -> float:
    return config.replicas * config.replica_cpus + config.ingress_replicas * config.ingress_cpus


def check_fits(config: ClusterConfig) -> None:
    """On a Ray instance we started ourselves, refuse a config whose CPUs it cannot place (Serve would wait
    forever for the missing replicas); a real cluster may autoscale, so it is left to Serve there."""
    import ray  # noqa: PLC0415

    have, need = ray.cluster_resources().get("CPU", 0.0), required_cpus(config)
    if need > have:
        raise ClusterConfigError(
            f"the application needs {need:g} CPUs ({config.replicas} engine replica(s) × {config.replica_cpus:g} + "
            f"{config.ingress_replicas} ingress × {config.ingress_cpus:g}) but this Ray instance has {have:g}; "
            "lower --replica-cpus (fractions are fine) or --replicas, or join a bigger cluster with --ray-address")


def deploy(config: ClusterConfig, *, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False):
    """Start Serve's proxy on ``host:port`` and run the application; returns the ingress handle."""
    from ray import serve  # noqa: PLC0415

    from lorafleet.cluster.ray_app import APP_NAME, build_app  # noqa: PLC0415 - defers fastapi/ray

    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=blocking)


def config_from_env(settings: Settings | None = None, **kwargs) -> ClusterConfig:
    """A ``ClusterConfig`` whose registry comes from ``settings`` (default: ``$LORAFLEET_DB_URL`` /
    ``$LORAFLEET_BLOB_URL``)."""
    settings = settings or Settings.from_env()
    db_url, blob_url = settings.db_url or "", settings.blob_url or ""
    if not blob_url and db_url.startswith("postgresql"):
        blob_url = str(settings.data_dir / "blobs")  # one machine's directory: fine for a single-node Ray
    kwargs.setdefault("base_dtype", os.environ.get("LORAFLEET_BASE_DTYPE") or None)  # replicas do not inherit env
    return ClusterConfig(db_url=db_url, blob_url=blob_url, **kwargs)
