"""The ingress's engine: an ``Engine``-shaped proxy that sends each request to an engine replica.

The HTTP routes (``lorafleet.api.openai_routes``) call ``service.engine.submit(prompt, digest, sampling)`` and
then either iterate the handle (streaming) or call ``handle.result()``. In cluster mode ``service.engine`` is a
:class:`RemoteEngine`: the routes are the same code, and ``submit`` becomes a Ray Serve call to the
``EngineReplica`` deployment with ``multiplexed_model_id = digest``, so Serve's router prefers a replica on which
that adapter is already resident. The alias → digest resolution stays in the route, against the shared
registry, per request — which is why a rollback takes effect on every replica at once.

Failures keep the single-process contract: an adapter that cannot be loaded gives a ``Result`` with
``finish_reason="error"``; a prompt the engine refuses gives a 400; a replica that dies under a request gives a
503 ``replica_unavailable`` (OpenAI clients retry it), and Serve replaces the replica.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from dataclasses import fields

from lorafleet.api.errors import ApiError
from lorafleet.cluster.fleet import fleet_view, merge_metrics
from lorafleet.serving.contract import Levels, adapter_levels
from lorafleet.serving.engine import RequestError, Result
from lorafleet.serving.metrics import Metrics
from lorafleet.serving.params import SamplingParams

log = logging.getLogger(__name__)
_RESULT_FIELDS = {f.name for f in fields(Result)}
REPLICA_HEADER = "x-lorafleet-replica"
AFFINITY_HEADER = "x-lorafleet-affinity"
# Per HTTP request, a dict the handle fills with the replica that served it (set by ``install_replica_headers``;
# the route waits for the result in a worker thread, whose context is a copy, so the dict is shared by reference).
_served_by: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lorafleet_served_by", default=None)


def install_replica_headers(app) -> None:
    """Answers of non-streaming completions say which replica served them, and whether the adapter was
    already resident there (``x-lorafleet-affinity: hit|miss``): what routing quality is measured with."""

    @app.middleware("http")
    async def replica_headers(request, call_next):
        box: dict = {}
        token = _served_by.set(box)
        try:
            response = await call_next(request)
        finally:
            _served_by.reset(token)
        if box.get("replica"):
            response.headers[REPLICA_HEADER] = box["replica"]
            if box.get("affinity_hit") is not None:
                response.headers[AFFINITY_HEADER] = "hit" if box["affinity_hit"] else "miss"
        return response


def model_id(adapter) -> str:
    """Serve's multiplexed model id of what a request runs on: its digest, a stack's digests joined by ``+``
    (root first), or ``""`` for the base."""
    if adapter is None:
        return ""
    return adapter if isinstance(adapter, str) else "+".join(adapter)


def result_from_wire(d: dict) -> Result:
    return Result(**{k: v for k, v in d.items() if k in _RESULT_FIELDS})


def _ray_failure(exc: BaseException, replica_hint: str = "") -> ApiError:
    """A Ray error under a request, as the HTTP error the client sees."""
    from ray import exceptions as rex  # noqa: PLC0415

    if isinstance(exc, rex.RayTaskError):  # replica code raised: a bug, not unavailability
        return ApiError(500, f"engine replica failed: {exc.cause if exc.cause else exc}", type_="server_error",
                        code="internal_error")
    return ApiError(503, f"the engine replica{replica_hint} became unavailable under this request "
                         f"({type(exc).__name__}); retry it — another replica will serve it",
                    type_="server_error", code="replica_unavailable")


class RemoteHandle:
    """``RequestHandle``-shaped: iterate for text deltas, or ``result()``. The call starts on first use."""

    def __init__(self, engine_handle, payload: dict) -> None:
        self.id = payload["request_id"]
        self._engine_handle = engine_handle
        self._payload = payload
        self._response = None
        self._result: Result | None = None
        self.replica: str | None = None
        self.affinity_hit: bool | None = None
        self._lock = threading.Lock()
        self._box = _served_by.get()  # submit() runs in the route's context

    def _options(self, stream: bool):
        return self._engine_handle.options(multiplexed_model_id=model_id(self._payload["adapter"]), stream=stream)

    def _take(self, out: dict) -> None:
        if "invalid" in out:  # the engine refused the prompt (too long, empty): the caller's fault
            raise ApiError(400, out["invalid"], param="messages" if isinstance(self._payload["prompt"], list)
                           else "prompt")
        self.replica, self.affinity_hit = out.get("replica"), out.get("affinity_hit")
        box = self._box
        if box is not None:
            box.update(replica=self.replica, affinity_hit=self.affinity_hit)
        self._result = result_from_wire(out["result"])

    def start(self) -> RemoteHandle:
        """Send the (non-streaming) call now; ``result()`` does it on first use otherwise."""
        with self._lock:
            if self._response is None:
                self._response = self._options(stream=False).generate.remote(self._payload)
        return self

    def result(self, timeout: float | None = None) -> Result:
        """The final result; request errors are in ``Result.error``. Raises ``ApiError`` for 400/5xx cases."""
        if self._result is not None:
            return self._result
        from ray.exceptions import RayError  # noqa: PLC0415

        self.start()
        try:
            out = self._response.result(timeout_s=timeout)
        except RayError as exc:
            raise _ray_failure(exc) from exc
        self._take(out)
        return self._result

    def __iter__(self):
        """Text deltas; raises ``RequestError`` at the end if the request failed (like ``RequestHandle``)."""
        from ray.exceptions import RayError  # noqa: PLC0415

        with self._lock:
            self._response = self._options(stream=True).generate_stream.remote(self._payload)
        try:
            for item in self._response:
                if "delta" in item:
                    yield item["delta"]
                else:
                    self._take(item)
        except RayError as exc:
            raise _ray_failure(exc) from exc
        if self._result is not None and self._result.error is not None:
            raise RequestError(self._result.error)

    def done(self) -> bool:
        return self._result is not None

    def cancel(self) -> None:
        if self._response is not None:
            self._response.cancel()


class RemoteEngine:
    """What the ingress's ``Service`` holds as its engine: requests go to ``EngineReplica`` by digest.

    ``residency_snapshot`` / ``metrics_snapshot`` / ``metrics`` merge the reports on the fleet board.
    """

    def __init__(self, engine_handle, board_handle, *, cache_s: float = 0.25) -> None:
        self.engine_handle = engine_handle
        self.board_handle = board_handle
        self._cache_s = cache_s
        self._cached: tuple[float, list[dict]] = (0.0, [])
        self._lock = threading.Lock()
        self._seq = 0

    def start(self) -> RemoteEngine:
        return self

    def stop(self) -> None:
        pass

    def submit(self, prompt, adapter: Levels | str | None = (), sampling=None, *, request_id: str | None = None):
        adapter = adapter_levels(adapter) or None  # a stack, root first (the engine checks the depth); None: base
        with self._lock:
            self._seq += 1
            rid = request_id or f"remote-{self._seq}"
        payload = {"prompt": prompt, "adapter": adapter, "sampling": sampling or SamplingParams(), "request_id": rid}
        return RemoteHandle(self.engine_handle, payload)

    def generate(self, prompts, adapters=None, sampling=None) -> list[Result]:
        """Submit all, wait for all (the ``Engine.generate`` contract), through the replicas."""
        adapters = [adapters] * len(prompts) if adapters is None or isinstance(adapters, str) else list(adapters)
        handles = [self.submit(p, a, sampling).start() for p, a in zip(prompts, adapters, strict=True)]
        return [h.result() for h in handles]

    def pin(self, digest: str) -> None:
        """Residency is Serve's multiplexing here, per replica; there is no one engine to pin in."""
        raise ValueError("pinning by hand is not available with --cluster ray: each replica pins the adapters "
                         "routed to it (multiplexed leases, adapters_per_replica of them), see docs/cluster.md")

    def unpin(self, digest: str) -> None:
        """Nothing is pinned by hand in cluster mode, so there is nothing to release."""
    # -- the fleet view --------------------------------------------------------------------------------------

    def reports(self) -> list[dict]:
        now = time.monotonic()
        with self._lock:
            t, cached = self._cached
            if now - t < self._cache_s:
                return cached
        reports = self.board_handle.reports.remote().result(timeout_s=30)
        with self._lock:
            self._cached = (time.monotonic(), reports)
        return reports

    def residency_snapshot(self) -> dict:
        return fleet_view(self.reports())

    def metrics_snapshot(self) -> dict:
        return self.metrics.snapshot()

    @property
    def metrics(self) -> Metrics:
        return merge_metrics([r["metrics"] for r in self.reports()])
