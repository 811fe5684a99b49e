"""The training job queue, persisted in the registry database.

States: ``queued -> running -> succeeded | failed | cancelled``. A job carries everything a worker on
any machine needs: the adapter ref, the LoRA spec, the training config, and the dataset's digest (its
records are a blob in the registry's blob store). Workers claim jobs atomically — ``SELECT ... FOR
UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite — and hold them under a lease they
renew every step; a job whose lease expired (its worker died) is claimable again and resumes from its
last checkpoint.
"""

from __future__ import annotations

import json
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from lorafleet.adapters import LoraSpec
from lorafleet.registry import NotFoundError, Registry, RegistryError
from lorafleet.registry import db as regdb
from lorafleet.registry.names import parse_ref
from lorafleet.registry.schema import jobs
from lorafleet.registry.stacks import stack_record
from lorafleet.training.data import Dataset
from lorafleet.training.trainer import TrainConfig

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")
WARM_STARTS = ("live", "none")


class JobError(RegistryError):
    """A job request or state change is invalid; nothing was changed."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Job:
    id: int
    ref: str
    state: str
    method: str
    spec: dict
    config: dict
    dataset_digest: str
    example_count: int
    warm_start: str
    creator: str
    auto_promote: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker_id: str | None
    lease_until: datetime | None
    attempts: int
    step: int
    total_steps: int
    loss: float | None
    losses: list
    checkpoint_digest: str | None
    result_number: int | None
    error: str | None
    cancel_requested: bool
    report: dict

    @property
    def lora_spec(self) -> LoraSpec:
        return LoraSpec(rank=self.spec["rank"], alpha=self.spec["alpha"], dropout=self.spec["dropout"],
                        target_modules=tuple(self.spec["target_modules"]))

    @property
    def stack_parents(self) -> list[dict]:
        """The frozen parent revisions this job trains on top of (root first; empty for a plain adapter)."""
        return list(self.spec.get("stack") or [])

    @property
    def train_config(self) -> TrainConfig:
        cfg = dict(self.config)
        cfg["betas"] = tuple(cfg.get("betas", (0.9, 0.999)))
        return TrainConfig(**cfg)

    @property
    def progress(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("created_at", "started_at", "finished_at", "lease_until"):
            out[k] = out[k].isoformat() if out[k] else None
        out["progress"] = round(self.progress, 4)
        return out


def _job(row) -> Job:
    m = row._mapping
    return Job(**{k: m[k] for k in Job.__dataclass_fields__})


def dataset_to_blob(dataset: Dataset) -> bytes:
    """Canonical bytes of a dataset (JSONL of its records), whose sha256 is ``dataset.digest``."""
    return b"".join(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                    for r in dataset.records)


class JobQueue:
    """Submit, inspect, cancel, and (for workers) claim / renew / finish jobs."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.engine = registry.engine

    # ---------------------------------------------------------------- clients

    def submit(self, ref: str, dataset: Dataset, spec: LoraSpec, config: TrainConfig, *, creator: str = "cli",
               warm_start: str = "live", auto_promote: bool = False, provenance: dict | None = None) -> Job:
        """Queue a training job for adapter ``ref`` (which must exist). The dataset blob is written first,
        then the job row in one transaction: a crash leaves at most an unreferenced blob, never half a job.
        ``provenance``: extra JSON fields the revision's hyperparams will carry (e.g. the interaction window).

        A stacked adapter trains on top of its parents: their live revisions, resolved now, are recorded in
        ``spec["stack"]`` (root first) and applied frozen by the worker, so a resumed job uses the same ones."""
        tenant, user, name = parse_ref(ref)
        ref = f"{tenant}/{user}/{name}"
        if warm_start not in WARM_STARTS:
            raise JobError(f"warm_start must be one of {WARM_STARTS}, got {warm_start!r}")
        if dataset.kind != config.method:
            raise JobError(f"the dataset holds {dataset.kind!r} records but the method is {config.method!r}")
        info = self.registry.get_adapter(ref)  # NotFoundError names the adapter and how to create it
        parents = [] if info.parent is None else stack_record(self.registry.resolve_stack(info.parent))
        blob = dataset_to_blob(dataset)
        self.registry.blobs.put(dataset.digest, blob)
        now = utcnow()
        values = {
            "ref": ref, "state": "queued", "method": config.method,
            "spec": {**spec.to_dict(), "stack": parents, **({"provenance": provenance} if provenance else {})},
            "config": config.to_dict(), "dataset_digest": dataset.digest, "example_count": len(dataset),
            "warm_start": warm_start, "creator": creator, "auto_promote": auto_promote, "created_at": now,
            "updated_at": now, "attempts": 0, "step": 0, "total_steps": config.steps, "losses": [],
            "cancel_requested": False, "report": {},
        }
        with regdb.write_tx(self.engine) as conn:
            job_id = conn.execute(jobs.insert().values(**values).returning(jobs.c.id)).scalar_one()
        return self.get(job_id)

    def get(self, job_id: int) -> Job:
        with regdb.read_tx(self.engine) as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise NotFoundError(f"training job {job_id} does not exist (see `lorafleet jobs ls`)")
        return _job(row)

    def list(self, *, state: str | None = None, ref: str | None = None, limit: int = 50,
             before_id: int | None = None) -> list[Job]:
        """Newest first; page with ``before_id`` = the last id of the previous page."""
        if state is not None and state not in STATES:
            raise JobError(f"unknown state {state!r}; one of {STATES}")
        stmt = sa.select(jobs).order_by(jobs.c.id.desc()).limit(max(1, min(limit, 1000)))
        if state:
            stmt = stmt.where(jobs.c.state == state)
        if ref:
            stmt = stmt.where(jobs.c.ref == ref)
        if before_id is not None:
            stmt = stmt.where(jobs.c.id < before_id)
        with regdb.read_tx(self.engine) as conn:
            return [_job(r) for r in conn.execute(stmt)]

    def cancel(self, job_id: int, *, actor: str = "cli") -> Job:
        """A queued job is cancelled at once; a running one at its worker's next step."""
        with regdb.write_tx(self.engine) as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id).with_for_update()).first()
            if row is None:
                raise NotFoundError(f"training job {job_id} does not exist")
            if row.state in FINAL:
                raise JobError(f"job {job_id} already {row.state}; nothing to cancel")
            now = utcnow()
            if row.state == "queued":
                conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                    state="cancelled", finished_at=now, updated_at=now, error=f"cancelled by {actor}"))
            else:
                conn.execute(jobs.update().where(jobs.c.id == job_id).values(cancel_requested=True, updated_at=now))
        return self.get(job_id)

    def counts(self) -> dict[str, int]:
        with regdb.read_tx(self.engine) as conn:
            rows = conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)).all()
        return {state: 0 for state in STATES} | {s: n for s, n in rows}

    # ---------------------------------------------------------------- workers

    def claim(self, worker_id: str, limit: int, *, lease_seconds: float, only: set[int] | None = None) -> list[Job]:
        """Atomically take up to ``limit`` queued jobs, or running jobs whose lease expired."""
        if limit <= 0:
            return []
        now = utcnow()
        claimable = sa.or_(jobs.c.state == "queued", sa.and_(jobs.c.state == "running", jobs.c.lease_until < now))
        stmt = sa.select(jobs.c.id).where(claimable).order_by(jobs.c.id).limit(limit)
        if only is not None:
            stmt = stmt.where(jobs.c.id.in_(sorted(only)))
        stmt = stmt.with_for_update(skip_locked=True)
        with regdb.write_tx(self.engine) as conn:
            ids = conn.execute(stmt).scalars().all()
            if ids:
                conn.execute(jobs.update().where(jobs.c.id.in_(ids)).values(
                    state="running", worker_id=worker_id, lease_until=now + timedelta(seconds=lease_seconds),
                    started_at=sa.func.coalesce(jobs.c.started_at, now), attempts=jobs.c.attempts + 1,
                    updated_at=now))
        return [self.get(i) for i in ids]

    def _owned_update(self, job_id: int, owner: str, **values) -> bool:
        """Update a job only while worker ``owner`` still holds it; False means the lease was lost."""
        values["updated_at"] = utcnow()
        with regdb.write_tx(self.engine) as conn:
            res = conn.execute(jobs.update().where(
                jobs.c.id == job_id, jobs.c.worker_id == owner, jobs.c.state == "running").values(**values))
        return res.rowcount == 1

    def heartbeat(self, job_id: int, worker_id: str, *, lease_seconds: float, step: int, loss: float | None,
                  losses: list, checkpoint_digest: str | None = None, report: dict | None = None) -> bool:
        """Renew the lease and record progress; False when the lease was lost (or the job deleted: its user was
        forgotten). A new ``checkpoint_digest`` supersedes the previous one, whose blob is deleted at once (nothing
        else needs it, and a forgotten user's older checkpoints must not linger unreferenced); so is the new one
        when the update is refused."""
        values = {"lease_until": utcnow() + timedelta(seconds=lease_seconds), "step": step, "loss": loss,
                  "losses": losses}
        if report is not None:
            values["report"] = report
        if checkpoint_digest is None:
            return self._owned_update(job_id, worker_id, **values)
        values.update(checkpoint_digest=checkpoint_digest, updated_at=utcnow())
        with regdb.write_tx(self.engine) as conn:
            old = conn.execute(sa.select(jobs.c.checkpoint_digest).where(jobs.c.id == job_id)).scalar()
            owned = conn.execute(jobs.update().where(
                jobs.c.id == job_id, jobs.c.worker_id == worker_id, jobs.c.state == "running").values(**values)
            ).rowcount == 1
        stale = {old} - {checkpoint_digest} if owned else {checkpoint_digest}
        self.registry.discard_blobs(stale)
        return owned

    def cancel_requested(self, job_id: int) -> bool:
        with regdb.read_tx(self.engine) as conn:
            return bool(conn.execute(sa.select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).scalar())

    def finish(self, job_id: int, worker_id: str, state: str, *, result_number: int | None = None,
               error: str | None = None, report: dict | None = None) -> bool:
        if state not in FINAL:
            raise JobError(f"finish state must be one of {FINAL}")
        values = {"state": state, "finished_at": utcnow(), "result_number": result_number, "error": error,
                  "lease_until": None}
        if report is not None:
            values["report"] = report
        return self._owned_update(job_id, worker_id, **values)

    def release(self, job_id: int, worker_id: str) -> bool:
        """Give a running job back to the queue (graceful worker stop); it resumes from its checkpoint."""
        return self._owned_update(job_id, worker_id, state="queued", worker_id=None, lease_until=None)
