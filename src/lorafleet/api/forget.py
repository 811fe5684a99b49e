"""Forgetting a user: the one inventory of every place lorafleet keeps a user's data, and the purge of each.

``PLACES`` lists them in the order they are purged (a place that can still *create* data of the user goes before
the places that data would land in)::

    tinker-sessions     this process's Tinker training runs of the user's adapters (marked forgotten: a save in
                        flight refuses), their sampling sessions, futures (results hold the user's outputs), and the
                        blobs of ephemeral samplers (save_weights_and_get_sampling_client: no revision names them)
    tinker-checkpoints  training checkpoints on disk: $LORAFLEET_HOME/tinker/<tenant>/<run>/<name>.safetensors
                        (weights + AdamW state) and <name>.json (names the adapter); found by that sidecar, so
                        also those of runs a previous server process made
    registry            one write transaction under the gc lock: every row of the user (adapters, revisions,
                        aliases, audit rows, commit keys, training jobs, interactions, feedback, memory settings —
                        tables found by their adapter_id / tenant+username columns) and every blob only they
                        referenced (revisions, job datasets and checkpoints, the ephemeral sampler blobs above).
                        The audit log keeps one tombstone: a hash of the name, who, when
    serving             the engine's residency of every deleted digest: compute slot zeroed, RAM copy dropped,
                        pins (the dashboard's) released, queued loads discarded; and Tinker's parsed-adapter cache

Superseded job checkpoints are deleted when the next one is recorded (``JobQueue.heartbeat``), and a worker whose
job vanished mid-training discards what it wrote, so no unreferenced blob of the user outlives them.

A new place is one more entry in ``PLACES``. Each ``purge(ctx)`` returns its counts; a place whose component is
not in this process (no engine, no Tinker service: the offline CLI) reports ``{}`` and is skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.registry.memory import MemoryStore
from lorafleet.registry.names import check_segment

log = logging.getLogger(__name__)


@dataclass
class Forgetting:
    """What the places share while one user is forgotten."""

    tenant: str
    user: str
    actor: str
    registry: object  # lorafleet.registry.Registry
    memory: object  # lorafleet.registry.memory.MemoryStore
    tinker: object | None = None  # lorafleet.api.tinker.core.TinkerService of this process, if any
    tinker_home: Path | None = None  # where training checkpoints live (default: $LORAFLEET_HOME/tinker)
    purge: Callable[[str], object] | None = None  # drop a digest from the serving engine's residency
    digests: set[str] = field(default_factory=set)  # blobs of the user: found by the places, then deleted
    deleted: list[str] = field(default_factory=list)  # blobs deleted (what the caches purge)


@dataclass(frozen=True)
class Place:
    name: str
    holds: str
    purge: Callable[[Forgetting], dict]


def _tinker_sessions(ctx: Forgetting) -> dict:
    if ctx.tinker is None:
        return {}
    counts, digests = ctx.tinker.forget_user(ctx.tenant, ctx.user)  # also deletes the run's checkpoint files
    ctx.digests |= digests
    return counts


def _tinker_checkpoints(ctx: Forgetting) -> dict:
    from lorafleet.api.tinker.core import default_home, forget_checkpoint_files  # noqa: PLC0415 - defers torch

    home = ctx.tinker_home or (ctx.tinker.home if ctx.tinker is not None else default_home())
    return {"tinker_checkpoint_files": forget_checkpoint_files(home, ctx.tenant, ctx.user)}


def _registry(ctx: Forgetting) -> dict:
    counts, deleted = ctx.memory.forget_rows(ctx.tenant, ctx.user, actor=ctx.actor, extra_digests=ctx.digests)
    ctx.deleted = deleted
    return counts


def _serving(ctx: Forgetting) -> dict:
    out = {}
    if ctx.purge is not None:
        for digest in ctx.deleted:
            ctx.purge(digest)
        out["purged_from_engine"] = len(ctx.deleted)
    if ctx.tinker is not None:
        out["tinker_cached_dropped"] = ctx.tinker.drop_cached(set(ctx.deleted))
    return out


PLACES: tuple[Place, ...] = (
    Place("tinker-sessions", "Tinker runs, samplers, futures, ephemeral sampler blobs (this process)",
          _tinker_sessions),
    Place("tinker-checkpoints", "Tinker training checkpoints under $LORAFLEET_HOME/tinker", _tinker_checkpoints),
    Place("registry", "database rows and blobs (revisions, jobs, interactions, feedback, settings)", _registry),
    Place("serving", "engine residency (slots, RAM, pins) and Tinker's parsed-adapter cache", _serving),
)


def forget_user(registry, tenant: str, user: str, *, actor: str = "cli", memory=None, tinker=None,
                tinker_home: Path | None = None, purge: Callable[[str], object] | None = None) -> dict:
    """Forget ``tenant/user`` in every place of :data:`PLACES`; returns the merged counts (and ``places``: which
    ran). Bad names are refused before anything changes."""
    check_segment(tenant, "tenant")
    check_segment(user, "user")
    ctx = Forgetting(tenant, user, actor, registry, memory or MemoryStore(registry), tinker=tinker,
                     tinker_home=tinker_home, purge=purge)
    report: dict = {"user": f"{tenant}/{user}", "purged_from_engine": 0, "tinker_checkpoint_files": 0}
    ran = []
    for place in PLACES:
        counts = place.purge(ctx)
        if counts:
            ran.append(place.name)
            for k, v in counts.items():
                report[k] = report.get(k, 0) + v if k != "audit_id" and isinstance(v, int) else v
    report["places"] = ran
    log.info("forgot %s/<user> in %s", tenant, ran)
    return report
