r"""lorafleet on Ray Serve: N engine replicas holding the base, adapter-aware routing, one shared registry.

::

    HTTP ─► Serve proxy ─► Ingress ×M   the FastAPI app of ``lorafleet.api`` (auth, OpenAI + management routes);
                              │          the route resolves ``tenant/user/adapter[@alias|#N]`` → digest in the
                              │          shared registry, per request (so a rollback reaches every replica)
                              │ handle.options(multiplexed_model_id=digest).generate.remote(...)
                              ▼          Serve's router prefers a replica that has that digest multiplexed
                     EngineReplica ×N    one Engine over the base; @serve.multiplexed leases = adapters pinned in
                              │          the engine's RAM (LRU beyond ``adapters_per_replica``); blobs from the
                              │          shared store through ``registry.read_blob``
                              │ every report_interval_s
                              ▼
                          FleetBoard     latest report per replica ─► Ingress: /v1/fleet/residency, /metrics

The multiplexed model id is the adapter revision's **digest**, never its name: names and aliases move, a
digest does not. Build the application with :func:`build_app`, or from a ``serve run`` config through
:func:`app_builder` (``import_path: lorafleet.cluster.ray_app:app_builder``); ``lorafleet serve --cluster ray``
does the former (see ``lorafleet.cluster.launch``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from ray import serve
from ray.serve import Application

from lorafleet.cluster.config import ClusterConfig
from lorafleet.cluster.fleet import ROUTING_COUNTERS, FleetBoard, raw_metrics
from lorafleet.config import quiet_libraries
from lorafleet.digest import check_digest
from lorafleet.registry import Registry

log = logging.getLogger(__name__)
APP_NAME = "lorafleet"
_END = object()


class AdapterLoadFailed(RuntimeError):
    """A multiplexed lease could not make the adapter resident (the engine logs why)."""


class AdapterLease:
    """One multiplexed "model" of a replica: an adapter (or a stack's levels) pinned in the replica's engine RAM.

    Serve's multiplexer calls ``__del__`` when it evicts the lease (LRU beyond ``adapters_per_replica``); the
    garbage collector may call it again later, hence the flag: a second call must not unpin a newer lease of
    the same digest. Stacks share levels, so pins are counted per digest by the replica.
    """

    def __init__(self, replica: EngineReplica, key: str, digests: tuple[str, ...]) -> None:
        self._replica, self.key, self.digests = replica, key, digests
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._replica._leased.discard(self.key)
        for digest in self.digests:
            self._replica._unpin(digest)

    def __del__(self) -> None:
        self.release()


def _setup_process(threads: int) -> None:
    import torch  # noqa: PLC0415


    torch.set_num_threads(threads)
    quiet_libraries()


@serve.deployment(name="FleetBoard", num_replicas=1, ray_actor_options={"num_cpus": 0})
class FleetBoardDeployment(FleetBoard):
    """The fleet board as a Serve deployment (one replica, no CPU reserved)."""


@serve.deployment(name="EngineReplica")
class EngineReplica:
    """One engine over the base; adapters arrive by digest as Serve multiplexed models."""

    async def __init__(self, config: ClusterConfig, board) -> None:
        _setup_process(config.torch_threads)
        from lorafleet.base import load_base  # noqa: PLC0415 - defers torch/transformers/triton
        from lorafleet.serving.engine import Engine  # noqa: PLC0415 - defers torch/transformers
        from lorafleet.serving.sources import registry_fetch  # noqa: PLC0415 - defers torch

        self.config = config
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()  # the replica actor's name
        self.registry = Registry(config.db_url, config.blob_url)
        self.base = load_base(config.base, precision=config.base_dtype)
        self.engine = Engine(self.base, registry_fetch(self.registry), config.engine).start()
        # Waiting for a result blocks a thread; one per request a replica accepts, so none waits for a thread.
        self._pool = ThreadPoolExecutor(max_workers=config.max_ongoing_requests + 2, thread_name_prefix="lf-wait")
        self._leased: set[str] = set()  # multiplexed model ids (digest, or a stack's digests joined by "+")
        self._pins: Counter[str] = Counter()  # leases pinning each digest (stacks share levels)
        self.routing = dict.fromkeys(ROUTING_COUNTERS, 0)
        self._counts_lock = threading.Lock()
        self._board = board
        self._closed = False

        async def load_adapter(digest: str) -> AdapterLease:  # a plain function: Serve keeps its LRU on it
            return await self._make_lease(digest)

        self._lease = serve.multiplexed(max_num_models_per_replica=config.adapters_per_replica)(load_adapter)
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop())
        log.info("engine replica %s up: base %s, %d adapters multiplexed at most", self.replica, self.base.name,
                 config.adapters_per_replica)

    # -- adapters as multiplexed models ----------------------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._counts_lock:
            self.routing[name] += 1

    def _pin(self, digest: str) -> None:
        with self._counts_lock:
            first = self._pins[digest] == 0
            self._pins[digest] += 1
        if first:
            try:
                self.engine.pin(digest)
            except Exception:
                self._unpin(digest, engine=False)
                raise

    def _unpin(self, digest: str, *, engine: bool = True) -> None:
        with self._counts_lock:
            self._pins[digest] -= 1
            last = self._pins[digest] <= 0
            if last:
                del self._pins[digest]
        if last and engine:
            try:
                self.engine.unpin(digest)
            except Exception as exc:  # noqa: BLE001 - an engine being closed has nothing left to unpin
                log.debug("unpin %s: %s", digest[:12], exc)

    async def _make_lease(self, key: str) -> AdapterLease:
        """Pin the digest(s) of ``key`` in the engine and wait until they are in RAM (fetched, verified, parsed,
        validated). ``key`` is a digest, or a stack's digests joined by ``+``."""
        from lorafleet.serving.residency import READY  # noqa: PLC0415 - defers torch

        digests = tuple(dict.fromkeys(check_digest(d) for d in key.split("+")))
        pinned: list[str] = []
        try:
            for digest in digests:
                self._pin(digest)
                pinned.append(digest)
            deadline = time.monotonic() + self.config.load_timeout_s
            for digest in digests:
                while (state := self.engine.residency.state(digest)) != READY:
                    if state is None:  # the load failed and the engine dropped the entry (its pin with it)
                        raise AdapterLoadFailed(f"adapter {digest[:12]} could not be made resident on {self.replica}")
                    if time.monotonic() > deadline:
                        raise AdapterLoadFailed(f"adapter {digest[:12]} not resident after "
                                                f"{self.config.load_timeout_s} s")
                    await asyncio.sleep(0.005)
        except Exception:
            self._count("lease_failures")
            for digest in pinned:
                self._unpin(digest)
            raise
        self._count("lease_loads")
        self._leased.add(key)
        return AdapterLease(self, key, digests)

    async def _acquire(self, adapter) -> bool | None:
        """Count the request; make its adapter (or stack) a resident multiplexed model. Returns whether it
        already was."""
        from lorafleet.cluster.remote import model_id  # noqa: PLC0415 - defers torch/transformers

        self._count("requests")
        if adapter is None:
            return None
        key = model_id(adapter)
        if serve.get_multiplexed_model_id() != key:
            raise ValueError(f"request for adapter {key[:12]} arrived with multiplexed model id "
                             f"{serve.get_multiplexed_model_id()!r}: the router could not place it by adapter")
        self._count("adapter_requests")
        hit = key in self._leased
        if hit:
            self._count("affinity_hits")
        try:
            await self._lease(key)
        except Exception as exc:  # noqa: BLE001 - the engine retries the load and reports the exact cause
            log.warning("lease for %s failed: %s", key[:12], exc)
        return hit

    def _submit(self, payload: dict):
        return self.engine.submit(payload["prompt"], payload["adapter"], payload["sampling"],
                                  request_id=payload["request_id"])

    # -- requests --------------------------------------------------------------------------------------------

    async def generate(self, payload: dict) -> dict:
        """One request, whole: ``{"result": Result fields, "replica", "affinity_hit"}`` or ``{"invalid": why}``."""
        hit = await self._acquire(payload["adapter"])
        try:
            handle = self._submit(payload)
        except ValueError as exc:  # prompt too long, empty, ...: the caller's fault
            return {"invalid": str(exc), "replica": self.replica}
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, handle.result)
        except asyncio.CancelledError:  # the client went away: stop generating for it
            handle.cancel()
            raise
        return {"result": asdict(result), "replica": self.replica, "affinity_hit": hit}

    async def generate_stream(self, payload: dict):
        """Streaming: ``{"delta": text}`` items, then one ``{"result": ...}`` (or one ``{"invalid": why}``)."""
        from lorafleet.serving.engine import RequestError  # noqa: PLC0415 - defers torch/transformers

        hit = await self._acquire(payload["adapter"])
        try:
            handle = self._submit(payload)
        except ValueError as exc:
            yield {"invalid": str(exc), "replica": self.replica}
            return
        loop, deltas = asyncio.get_running_loop(), iter(handle)
        try:
            while (delta := await loop.run_in_executor(self._pool, next, deltas, _END)) is not _END:
                yield {"delta": delta}
        except RequestError:
            pass  # the result below carries the error
        except asyncio.CancelledError:
            handle.cancel()
            raise
        yield {"result": asdict(handle.result()), "replica": self.replica, "affinity_hit": hit}

    # -- the fleet view and health ---------------------------------------------------------------------------

    def _report(self) -> dict:
        with self._counts_lock:
            routing = dict(self.routing)
        return {"replica": self.replica, "routing": routing, "multiplexed": sorted(self._leased),
                "residency": self.engine.residency_snapshot(), "metrics": raw_metrics(self.engine.metrics)}

    async def _report_loop(self) -> None:
        while not self._closed:
            try:
                await self._board.report.remote(self.replica, self._report())
            except Exception as exc:  # noqa: BLE001 - the board restarting must not stop serving
                log.debug("report to the fleet board failed: %s", exc)
            await asyncio.sleep(self.config.report_interval_s)

    def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``; a replica whose engine loop died is replaced."""
        if not self.engine.running:
            raise RuntimeError(f"the engine loop of {self.replica} is not running")

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self.engine.close()
            self.registry.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
        except Exception as exc:  # noqa: BLE001 - shutting down
            log.debug("engine replica shutdown: %s", exc)


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The HTTP face: the same FastAPI app as ``lorafleet serve``, its engine a :class:`RemoteEngine`."""

    def __init__(self, config: ClusterConfig, engine, board) -> None:
        _setup_process(config.torch_threads)
        from lorafleet.api.service import Service  # noqa: PLC0415 - defers torch
        from lorafleet.base import load_base  # noqa: PLC0415 - defers torch/transformers/triton
        from lorafleet.cluster.remote import RemoteEngine  # noqa: PLC0415 - defers torch/transformers

        # The base is loaded here too: its name and fingerprint check requests, and uploads are validated
        # against its shapes before anything is committed.
        self.service = Service(Registry(config.db_url, config.blob_url),
                               load_base(config.base, precision=config.base_dtype),
                               RemoteEngine(engine, board), run_worker=False, metrics_public=config.metrics_public)

    def __serve_build_asgi_app__(self):
        from lorafleet.api.app import create_app  # noqa: PLC0415 - defers torch
        from lorafleet.cluster.remote import install_replica_headers  # noqa: PLC0415 - defers torch/transformers

        app = create_app(self.service)
        install_replica_headers(app)
        return app


def build_app(config: ClusterConfig) -> Application:
    """The Serve application for ``config``: ``serve.run(build_app(cfg), name="lorafleet", route_prefix="/")``."""
    board = FleetBoardDeployment.bind(stale_after_s=max(10.0, 4 * config.report_interval_s))
    engine = EngineReplica.options(
        num_replicas=config.replicas, max_ongoing_requests=config.max_ongoing_requests,
        health_check_period_s=config.health_check_period_s,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
    ).bind(config, board)
    return Ingress.options(
        num_replicas=config.ingress_replicas, max_ongoing_requests=max(64, 4 * config.max_ongoing_requests),
        ray_actor_options={"num_cpus": config.ingress_cpus},
    ).bind(config, engine, board)


def app_builder(args: dict) -> Application:
    """Application builder for ``serve run`` / ``serve deploy`` configs (``args:`` → :class:`ClusterConfig`)."""
    return build_app(ClusterConfig.from_args(args))
