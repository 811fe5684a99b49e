"""Evaluation's generation through the serving engine: the one engine-backed backend (demo, bench, benchmarks).

Pass an :class:`EngineBackend` as ``backend=`` to the evaluation functions that generate (see
``evaluation.generation``). It owns an engine whose fetch reads ``blobs`` first — the canonical bytes of the
adapters evaluation handed over — then ``fetch`` (the registry's ``read_blob``, say). An adapter already stored
under a digest that fetch reaches (a registry blob in some codec) is named with :meth:`EngineBackend.known`, so
the engine serves those very bytes; any other adapter is serialised (``to_bytes``) and served by its digest.
"""

from __future__ import annotations

from collections.abc import Callable

from lorafleet.adapters import to_bytes
from lorafleet.digest import digest_of
from lorafleet.serving.engine import Engine
from lorafleet.serving.params import EngineConfig, SamplingParams


class EngineBackend:
    """A generation backend over its own :class:`~lorafleet.serving.engine.Engine` (continuous batching,
    adapters by digest); ``engine`` is public for callers that also serve through it. Close it when done."""

    def __init__(self, base, fetch: Callable[[str], bytes] | None = None, config: EngineConfig | None = None) -> None:
        self.blobs: dict[str, bytes] = {}
        self._known: dict[int, tuple[object, str]] = {}  # id(adapter) -> (adapter, digest); the ref pins the id
        self._fetch = fetch
        self.engine = Engine(base, self._read, config or EngineConfig())

    def _read(self, digest: str) -> bytes:
        if digest in self.blobs or self._fetch is None:
            return self.blobs[digest]
        return self._fetch(digest)

    def add(self, adapter) -> str:
        """Serialise ``adapter`` into ``blobs`` and name it by its digest; returns the digest."""
        data = to_bytes(adapter)
        digest = digest_of(data)
        self.blobs[digest] = data
        self.known(adapter, digest)
        return digest

    def known(self, adapter, digest: str) -> None:
        """Serve ``adapter`` as the blob ``digest`` (which ``blobs`` or the fetch holds) until :meth:`forget`."""
        self._known[id(adapter)] = (adapter, digest)

    def forget(self) -> None:
        """Drop the names given with :meth:`known` / :meth:`add` (the blobs stay fetchable)."""
        self._known.clear()

    def _digest(self, adapter) -> str:
        hit = self._known.get(id(adapter))
        if hit is not None and hit[0] is adapter:
            return hit[1]
        data = to_bytes(adapter)
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def __call__(self, base, prompts: list, adapters: list, max_new_tokens: int) -> list[str]:
        digests = [None if a is None else self._digest(a) for a in adapters]
        # prompts arrive as chat messages (evaluation.generation makes a text prompt a user message)
        results = self.engine.generate(prompts, digests, SamplingParams(max_tokens=max_new_tokens))
        return [r.raise_for_error().text for r in results]

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> EngineBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
