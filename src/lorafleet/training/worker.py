"""The training worker: takes jobs from the queue and trains them packed into shared steps.

Several users' jobs run in the same optimizer steps over the one resident base (the multi-tenant
trainer). Between steps the worker renews its leases, honours cancellations, writes checkpoints, and
takes newly queued jobs into the pack. A finished job becomes a registry revision with full provenance
and the ``candidate`` alias. A job for a stacked adapter trains on top of its frozen parents (the revisions
recorded in the job, loaded once per digest and shared by every job on them); the revision records them in
``provenance.hyperparams["stack_parents"]``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lorafleet.adapters import AdapterError, LoraAdapter, from_bytes, to_bytes
from lorafleet.digest import digest_of
from lorafleet.registry import KeyConflictError, NotFoundError, Provenance, Registry
from lorafleet.training.checkpoint import checkpoint_from_bytes, checkpoint_to_bytes
from lorafleet.training.data import dataset_from_records
from lorafleet.training.jobs import Job, JobQueue, default_worker_id
from lorafleet.training.trainer import MultiTenantTrainer

log = logging.getLogger(__name__)

FAULT_ENV = "LORAFLEET_WORKER_FAULT"  # "kill_after_step:N" — tests: SIGKILL the worker after global step N


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker packs and protects jobs."""

    max_jobs: int = 8  # users packed into one step
    lease_seconds: float = 120.0  # a dead worker's jobs are reclaimable after this
    checkpoint_every: int = 10  # steps between checkpoints (and always at the end)
    poll_seconds: float = 1.0  # idle wait between queue polls

    def __post_init__(self) -> None:
        if self.max_jobs < 1 or self.lease_seconds <= 0 or self.checkpoint_every < 1 or self.poll_seconds < 0:
            raise ValueError(f"invalid WorkerConfig {self}: max_jobs>=1, lease_seconds>0, checkpoint_every>=1")


@dataclass
class _Running:
    job: Job
    parent: int | None
    parent_digest: str | None
    dataset_digest: str


class Worker:
    """Runs jobs from ``registry``'s queue on ``base``. ``on_progress(job_id, step, total, loss)`` is called
    after every step (for progress bars); each of ``hooks()`` at the top of every loop iteration."""

    def __init__(self, registry: Registry, base, config: WorkerConfig | None = None, *, worker_id: str | None = None,
                 on_progress: Callable[[int, int, int, float], None] | None = None,
                 hooks: Sequence[Callable[[], object]] = ()) -> None:
        self.registry = registry
        self.queue = JobQueue(registry)
        self.base = base
        self.config = config or WorkerConfig()
        self.worker_id = worker_id or default_worker_id()
        self.on_progress = on_progress
        self.hooks = list(hooks)  # run at the top of every loop iteration (e.g. the update scheduler's tick)
        self.trainer = MultiTenantTrainer(base)
        self.running: dict[int, _Running] = {}
        self.global_steps = 0
        self.finished: list[Job] = []
        self._parents: dict[str, LoraAdapter] = {}  # digest -> frozen parent adapter
        fault = os.environ.get(FAULT_ENV, "")
        self._kill_after = int(fault.split(":")[1]) if fault.startswith("kill_after_step:") else None

    @staticmethod
    def _key(job_id: int) -> str:
        return f"job-{job_id}"

    # ---------------------------------------------------------------- lifecycle of one job

    def _start(self, job: Job) -> None:
        done = self._revision_of_job(job)
        if done is not None:  # an earlier attempt committed, then died before marking the job finished
            log.info("job %d already committed %s#%d; finishing it without training again", job.id, job.ref, done)
            self._finish(job.id, "succeeded", result_number=done, report=job.report)
            return
        try:
            records = _jsonl_records(self.registry.read_blob(job.dataset_digest))
            dataset = dataset_from_records(records, job.method, source=f"job {job.id} dataset")
            parent, parent_digest, adapter = self._initial_adapter(job)
            track = self.trainer.add(self._key(job.id), adapter, dataset, job.train_config,
                                     parents=self._stack_parents(job))
            if job.checkpoint_digest:
                self.trainer.load_state_dict(self._key(job.id), checkpoint_from_bytes(
                    self.registry.read_blob(job.checkpoint_digest)))
                log.info("job %d resumes from its checkpoint at step %d", job.id, track.step)
            self.running[job.id] = _Running(job, parent, parent_digest, dataset.digest)
        except Exception as exc:  # noqa: BLE001 - any failure to start is this job's failure only
            log.warning("job %d failed to start: %s", job.id, exc)
            self.trainer.users.pop(self._key(job.id), None)
            self._finish(job.id, "failed", error=f"{type(exc).__name__}: {exc}")

    def _initial_adapter(self, job: Job) -> tuple[int | None, str | None, LoraAdapter]:
        """Warm start from ``live`` (a chain of revisions, parent recorded) or a fresh adapter."""
        spec = job.lora_spec
        if job.warm_start == "live":
            try:
                info, blob = self.registry.load(f"{job.ref}@live", base_fingerprint=self.base.fingerprint)
            except NotFoundError:
                info = None
            if info is not None:
                adapter = from_bytes(blob, self.base)
                if adapter.spec.rank != spec.rank or adapter.spec.target_modules != spec.target_modules:
                    log.info("job %d: live revision has another shape (%s); training from its weights", job.id,
                             adapter.spec.to_dict())
                return info.number, info.digest, adapter
        seed = job.train_config.seed
        return None, None, LoraAdapter.create(self.base, spec, seed=seed)

    def _stack_parents(self, job: Job) -> list[LoraAdapter]:
        """The job's frozen parents, one object per digest across running jobs (so they share a slot)."""
        in_use = {p["digest"] for run in self.running.values() for p in run.job.stack_parents}
        self._parents = {d: a for d, a in self._parents.items() if d in in_use}
        out = []
        for level in job.stack_parents:
            digest = level["digest"]
            if digest not in self._parents:
                info, blob = self.registry.load(level["address"], base_fingerprint=self.base.fingerprint)
                if info.digest != digest:  # pragma: no cover - a numbered revision is immutable
                    raise RuntimeError(f"{level['address']} is {info.digest[:12]}, not the recorded {digest[:12]}")
                self._parents[digest] = from_bytes(blob, self.base)
            out.append(self._parents[digest])
        return out

    def _checkpoint(self, job_id: int) -> str:
        data = checkpoint_to_bytes(self.trainer.state_dict(self._key(job_id)))
        digest = digest_of(data)
        self.registry.blobs.put(digest, data)
        return digest

    def _complete(self, job_id: int) -> None:
        run = self.running[job_id]
        track = self.trainer.users[self._key(job_id)]
        job = run.job
        if not all(math.isfinite(v) for v in track.losses):
            self._finish(job_id, "failed", error="training diverged: the loss became NaN/Inf")
            return
        try:  # finite but absurd weights would serve NaN: refuse them as a commit (as an upload is refused)
            track.adapter.check_delta_norms(self.base)
        except AdapterError as exc:
            self._finish(job_id, "failed", error=f"training diverged: {exc}")
            return
        try:
            existing = self._commit(job, run, track)
        except NotFoundError as exc:  # the adapter was deleted (its user forgotten) while training
            self.registry.discard_blobs([digest_of(to_bytes(track.adapter))])  # the refused commit's blob
            self._finish(job_id, "failed", error=str(exc))
            return
        self._finish(job_id, "succeeded", result_number=existing, report=_report(track))

    def _commit(self, job: Job, run: _Running, track) -> int:
        """The job's revision: committed now, or found (committed by an earlier attempt that died before finish)."""
        existing = self._revision_of_job(job)
        if existing is None:
            blob = to_bytes(track.adapter)
            provenance = Provenance(
                base_fingerprint=self.base.fingerprint, parent=run.parent, parent_digest=run.parent_digest,
                method=job.method,
                hyperparams={**job.lora_spec.to_dict(), **job.train_config.to_dict(), "job_id": job.id,
                             "base_precision": getattr(self.base, "precision_label", "fp32"),
                             "final_loss": track.losses[-1] if track.losses else None,
                             **({"stack_parents": job.stack_parents} if job.stack_parents else {}),
                             **job.spec.get("provenance", {})},
                dataset_digest=run.dataset_digest, example_count=job.example_count, creator=job.creator,
            )
            try:
                existing = self.registry.commit(job.ref, blob, provenance, creator=job.creator,
                                                aliases=("candidate",), create=False, key=job_key(job.id)).number
            except KeyConflictError:  # another attempt of this job committed first (other bytes): that one counts
                self.registry.discard_blobs([digest_of(blob)])
                existing = self._revision_of_job(job)
        return existing

    def _revision_of_job(self, job: Job) -> int | None:
        """The revision this job committed, if any (the worker died between commit and finish): recorded under the
        job's commit key in the commit's own transaction, so it is found however many revisions came since."""
        found = self.registry.keyed(*job_key(job.id))
        return found[1].number if found is not None and found[0] == job.ref else None

    def _finish(self, job_id: int, state: str, *, result_number=None, error=None, report=None) -> None:
        self.trainer.users.pop(self._key(job_id), None)
        self.running.pop(job_id, None)
        if self.queue.finish(job_id, self.worker_id, state, result_number=result_number, error=error, report=report):
            self.finished.append(self.queue.get(job_id))
        else:
            log.warning("job %d: lease lost before it could be marked %s", job_id, state)

    # ---------------------------------------------------------------- the loop

    def run(self, *, until_idle: bool = True, stop: threading.Event | None = None, only: set[int] | None = None,
            max_steps: int | None = None) -> list[Job]:
        """Train until the queue is empty (``until_idle``) or ``stop`` is set; returns the jobs finished here."""
        stop = stop or threading.Event()
        steps_here, idle = 0, False
        while not stop.is_set():
            for hook in self.hooks:
                hook()
            room = self.config.max_jobs - len(self.running)
            for job in self.queue.claim(self.worker_id, room, lease_seconds=self.config.lease_seconds, only=only):
                if job.id in self.running:  # our own lease ran out during a slow step and we re-claimed it: go on
                    continue
                self._start(job)
            if not self.running:
                if until_idle:
                    if idle or not self.hooks:
                        break
                    idle = True  # one more pass: the hooks see what just finished (and may queue more)
                    continue
                stop.wait(self.config.poll_seconds)
                continue
            idle = False
            self._step()
            steps_here += 1
            if max_steps is not None and steps_here >= max_steps:
                break
        for job_id in list(self.running):  # stopped early: hand the jobs back, with a fresh checkpoint
            digest = self._checkpoint(job_id)
            track = self.trainer.users[self._key(job_id)]
            self.queue.heartbeat(job_id, self.worker_id, lease_seconds=self.config.lease_seconds, step=track.step,
                                 loss=track.losses[-1] if track.losses else None, losses=track.losses,
                                 checkpoint_digest=digest)
            self.queue.release(job_id, self.worker_id)
            self.trainer.users.pop(self._key(job_id), None)
            self.running.pop(job_id)
        return self.finished

    def _step(self) -> None:
        keys = [self._key(j) for j in self.running]
        losses = self.trainer.step(keys)
        self.global_steps += 1
        for job_id in list(self.running):
            track = self.trainer.users[self._key(job_id)]
            loss = losses.get(self._key(job_id))
            digest = None
            if track.done or track.step % self.config.checkpoint_every == 0:
                digest = self._checkpoint(job_id)
            owned = self.queue.heartbeat(job_id, self.worker_id, lease_seconds=self.config.lease_seconds,
                                         step=track.step, loss=loss, losses=track.losses, checkpoint_digest=digest,
                                         report=_report(track))
            if self.on_progress is not None and loss is not None:
                self.on_progress(job_id, track.step, track.config.steps, loss)
            if not owned:  # another worker reclaimed it (we were too slow): drop it, never double-commit
                log.warning("job %d: lease lost; dropping it from this worker", job_id)
                self.trainer.users.pop(self._key(job_id), None)
                self.running.pop(job_id)
            elif self.queue.cancel_requested(job_id):
                self._finish(job_id, "cancelled", error=f"cancelled at step {track.step}")
            elif track.done:
                self._complete(job_id)
        if self._kill_after is not None and self.global_steps >= self._kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


def job_key(job_id: int) -> tuple[str, str]:
    """The commit key of a job's revision (see ``Registry.commit``'s ``key``)."""
    return ("job", str(job_id))


def _report(track) -> dict:
    return {"examples": track.report.examples, "truncated": track.report.truncated,
            "dropped": len(track.report.dropped)}


def _jsonl_records(blob: bytes) -> list[dict]:
    import json  # noqa: PLC0415

    return [json.loads(line) for line in blob.decode("utf-8").splitlines() if line.strip()]
