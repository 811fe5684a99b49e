"""The engine contract: what the API and the cluster rely on, met by :class:`lorafleet.serving.engine.Engine`
(one process) and :class:`lorafleet.cluster.remote.RemoteEngine` (replicas on Ray Serve)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from lorafleet.digest import check_digest
from lorafleet.serving.params import SamplingParams

Levels = tuple[str, ...]  # what a request runs on: adapter digests, root first; () = the base alone


def adapter_levels(adapter: str | Sequence[str] | None) -> Levels:
    """The one normal form of an adapter argument: a tuple of checked digests (a lone digest is a 1-tuple, None
    and () the base). Depth and slot limits are the engine's to check."""
    if adapter is None:
        return ()
    if isinstance(adapter, str):
        return (check_digest(adapter, what="adapter digest"),)
    if not isinstance(adapter, (tuple, list)):
        raise ValueError(f"adapter must be a digest, a tuple of digests (a stack) or None, got {adapter!r}")
    return tuple(check_digest(d, what="adapter digest") for d in adapter)


@runtime_checkable
class EngineLike(Protocol):
    """An inference engine the HTTP service can drive (submit, residency, metrics, lifecycle)."""

    def start(self) -> EngineLike: ...

    def stop(self) -> None: ...

    def submit(self, prompt, adapter: Levels | str | None = (), sampling: SamplingParams | None = None, *,
               request_id: str | None = None): ...

    def generate(self, prompts: Sequence, adapters=None, sampling=None) -> list: ...

    def pin(self, digest: str) -> None: ...

    def unpin(self, digest: str) -> None: ...

    def residency_snapshot(self) -> dict: ...

    def metrics_snapshot(self) -> dict: ...
