"""A user's memory: captured conversations, feedback on them, memory settings, and forgetting.

::

    served answer (capture on) ──► interactions (response_id, prompt, response, revision)
    POST /v1/feedback ──► feedback: rating ≥ 1          -> SFT example (the answer as served)
                                    rewrite             -> SFT example (prompt + the user's rewrite)
                                    choice of 2 answers -> DPO pair (chosen / rejected, same prompt)
    scheduler (lorafleet.continual.schedule) reads feedback ids > watermark as "new examples"

Capture is opt-in per adapter (``capture`` in the adapter's memory settings, off by default). Both tables are
size-bounded per user: past ``max_interactions`` / ``max_feedback`` rows the oldest are deleted on insert.

Forgetting: :mod:`lorafleet.api.forget` lists every place a user's data lives; this store's part
(:meth:`MemoryStore.forget_rows`) deletes, in one write transaction that holds the same lock as
commits and gc, every row of the user (interactions, feedback, settings, adapters, revisions, aliases, audit
rows, training jobs; another user's adapter stacked on one of theirs loses that parent) and every blob only they
referenced (revision blobs, job datasets and checkpoints; a blob
another user's revision or job references by digest stays, referenced by them only). The audit log keeps one
tombstone: who ran it, when, and a hash of the forgotten user's name (not the name). The deleted digests go back
to the caller, which purges them from a serving engine's residency tiers (RAM, compute slots, pins).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime

import sqlalchemy as sa

from . import db
from .errors import InvalidArgumentError, NotFoundError
from .names import check_segment, parse_ref
from .records import utcnow
from .retention import _referenced
from .schema import adapters, audit, feedback, interactions, jobs, metadata, revisions, schedules

log = logging.getLogger(__name__)

MAX_INTERACTIONS = 10_000  # per user: the oldest are dropped beyond this
MAX_FEEDBACK = 10_000  # per user
MAX_TEXT = 200_000  # characters of one rewrite / response
RATINGS = (-1, 0, 1)
FORGET_ACTION = "user.forget"


@dataclass(frozen=True)
class MemorySettings:
    """An adapter's memory settings: capture opt-in, scheduled updates and the scheduler's bookkeeping."""

    ref: str
    capture: bool = False
    enabled: bool = False  # scheduled updates on
    policy: dict = field(default_factory=dict)  # lorafleet.continual.schedule.UpdatePolicy.to_dict()
    watermark: int = 0  # feedback ids <= watermark were trained on already
    pending_job: int | None = None
    pending_watermark: int | None = None
    last_run_at: datetime | None = None
    last_result: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["last_run_at"] = self.last_run_at.isoformat() if self.last_run_at else None
        return out


def user_hash(tenant: str, user: str) -> str:
    """What the tombstone keeps of a forgotten user: a hash of ``tenant/user`` (verifiable, not readable)."""
    return hashlib.sha256(f"{tenant}/{user}".encode()).hexdigest()[:16]


def _prompt_messages(row) -> list[dict]:
    prompt = row.prompt
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def _interaction(row) -> dict:
    return {"id": row.id, "response_id": row.response_id, "ref": f"{row.tenant}/{row.username}/{row.adapter}",
            "revision": row.revision, "kind": row.kind, "prompt": row.prompt, "response": row.response,
            "created_at": row.created_at.isoformat()}


def _feedback(row) -> dict:
    return {"id": row.id, "response_id": row.response_id, "ref": f"{row.tenant}/{row.username}/{row.adapter}",
            "kind": row.kind, "rating": row.rating, "method": row.method, "record": row.record,
            "created_at": row.created_at.isoformat()}


class MemoryStore:
    """Interactions, feedback, memory settings and forgetting, in the registry's database and blob store."""

    def __init__(self, registry, *, max_interactions: int = MAX_INTERACTIONS, max_feedback: int = MAX_FEEDBACK):
        if max_interactions < 1 or max_feedback < 1:
            raise InvalidArgumentError("max_interactions and max_feedback must be >= 1")
        self.registry = registry
        self.engine = registry.engine
        self.max_interactions = max_interactions
        self.max_feedback = max_feedback

    # ---------------------------------------------------------------- settings

    def settings(self, ref: str) -> MemorySettings:
        """The adapter's memory settings (defaults — capture off, no schedule — when never set)."""
        tenant, user, name = parse_ref(ref)
        with db.read_tx(self.engine) as conn:
            row = conn.execute(sa.select(schedules).where(
                schedules.c.tenant == tenant, schedules.c.username == user, schedules.c.adapter == name)).first()
        if row is None:
            return MemorySettings(ref=ref)
        return MemorySettings(ref=ref, capture=row.capture, enabled=row.enabled, policy=dict(row.policy or {}),
                              watermark=row.watermark, pending_job=row.pending_job,
                              pending_watermark=row.pending_watermark, last_run_at=row.last_run_at,
                              last_result=dict(row.last_result or {}))

    def configure(self, ref: str, *, capture: bool | None = None, enabled: bool | None = None,
                  policy: dict | None = None) -> MemorySettings:
        """Change an existing adapter's memory settings (only the arguments given)."""
        tenant, user, name = parse_ref(ref)
        self.registry.get_adapter(ref)  # NotFoundError names the adapter
        for value, what in ((capture, "capture"), (enabled, "enabled")):
            if value is not None and not isinstance(value, bool):
                raise InvalidArgumentError(f"{what} must be true or false, got {value!r}")
        if policy is not None and not isinstance(policy, dict):
            raise InvalidArgumentError(f"policy must be a dict, got {type(policy).__name__}")
        current = self.settings(ref)
        values = {"capture": current.capture if capture is None else capture,
                  "enabled": current.enabled if enabled is None else enabled,
                  "policy": current.policy if policy is None else policy, "updated_at": utcnow()}
        key = (schedules.c.tenant == tenant, schedules.c.username == user, schedules.c.adapter == name)
        with db.write_tx(self.engine) as conn:
            if conn.execute(sa.select(schedules.c.tenant).where(*key)).first() is None:
                conn.execute(schedules.insert().values(tenant=tenant, username=user, adapter=name, watermark=0,
                                                       last_result={}, **values))
            else:
                conn.execute(schedules.update().where(*key).values(**values))
        return self.settings(ref)

    def update_schedule_state(self, ref: str, **values) -> None:
        """Scheduler bookkeeping: ``watermark``, ``pending_job``, ``pending_watermark``, ``last_run_at``,
        ``last_result``."""
        allowed = {"watermark", "pending_job", "pending_watermark", "last_run_at", "last_result"}
        if set(values) - allowed:
            raise InvalidArgumentError(f"unknown schedule fields {sorted(set(values) - allowed)}")
        tenant, user, name = parse_ref(ref)
        with db.write_tx(self.engine) as conn:
            conn.execute(schedules.update().where(
                schedules.c.tenant == tenant, schedules.c.username == user, schedules.c.adapter == name,
            ).values(updated_at=utcnow(), **values))

    def scheduled(self) -> list[MemorySettings]:
        """Every adapter with scheduled updates enabled."""
        with db.read_tx(self.engine) as conn:
            rows = conn.execute(sa.select(schedules.c.tenant, schedules.c.username, schedules.c.adapter)
                                .where(schedules.c.enabled.is_(True))
                                .order_by(schedules.c.tenant, schedules.c.username, schedules.c.adapter)).all()
        return [self.settings(f"{t}/{u}/{a}") for t, u, a in rows]

    # ---------------------------------------------------------------- capture

    def record(self, ref: str, response_id: str, *, prompt, response: str, revision: int | None,
               kind: str = "chat") -> bool:
        """Store one served exchange if the adapter captures; returns whether it was stored."""
        tenant, user, name = parse_ref(ref)
        if not self.settings(ref).capture:
            return False
        if not isinstance(response_id, str) or not 1 <= len(response_id) <= 64:
            raise InvalidArgumentError("response_id must be a string of 1-64 characters")
        if kind not in ("chat", "completion"):
            raise InvalidArgumentError(f"kind must be 'chat' or 'completion', got {kind!r}")
        with db.write_tx(self.engine) as conn:
            conn.execute(interactions.insert().values(
                response_id=response_id, tenant=tenant, username=user, adapter=name, revision=revision, kind=kind,
                prompt=prompt, response=response[:MAX_TEXT], created_at=utcnow()))
            self._trim(conn, interactions, tenant, user, self.max_interactions)
        return True

    def _trim(self, conn, table: sa.Table, tenant: str, user: str, bound: int) -> None:
        """Delete the user's oldest rows of ``table`` beyond ``bound``."""
        mine = (table.c.tenant == tenant, table.c.username == user)
        cutoff = conn.execute(sa.select(table.c.id).where(*mine).order_by(table.c.id.desc())
                              .offset(bound).limit(1)).scalar()
        if cutoff is not None:
            conn.execute(table.delete().where(*mine, table.c.id <= cutoff))

    def interaction(self, response_id: str) -> dict | None:
        with db.read_tx(self.engine) as conn:
            row = conn.execute(sa.select(interactions).where(interactions.c.response_id == response_id)).first()
        return _interaction(row) if row is not None else None

    # ---------------------------------------------------------------- feedback

    def add_feedback(self, response_id: str, *, rating: int | None = None, rewrite: str | None = None,
                     other_id: str | None = None, preferred: str = "this",
                     tenant: str | None = None) -> dict:
        """Feedback on a captured response: a rating, a preferred rewrite (an SFT example), or a choice between
        it and ``other_id`` (a DPO pair; ``preferred`` is ``"this"`` or ``"other"``). ``tenant`` (a tenant key's)
        restricts which responses are visible: another tenant's response is reported as missing."""
        if rating is None and rewrite is None and other_id is None:
            raise InvalidArgumentError("feedback needs a rating, a rewrite, or other_id (a choice between two answers)")
        if rewrite is not None and other_id is not None:
            raise InvalidArgumentError("give either a rewrite or a choice (other_id), not both")
        if rating is not None and (isinstance(rating, bool) or rating not in RATINGS):
            raise InvalidArgumentError(f"rating must be one of {RATINGS} (thumbs down, neutral, up), got {rating!r}")
        if rewrite is not None and (not isinstance(rewrite, str) or not rewrite.strip() or len(rewrite) > MAX_TEXT):
            raise InvalidArgumentError(f"rewrite must be a non-empty string of at most {MAX_TEXT} characters")
        if preferred not in ("this", "other"):
            raise InvalidArgumentError(f"preferred must be 'this' or 'other', got {preferred!r}")
        this = self._visible(response_id, tenant)
        kind, method, record = "rating", None, None
        if rewrite is not None:
            kind, method = "rewrite", "sft"
            record = {"messages": [*_prompt_messages(this), {"role": "assistant", "content": rewrite}]}
        elif other_id is not None:
            other = self._visible(other_id, tenant)
            if other.id == this.id:
                raise InvalidArgumentError("other_id names the same response; a choice needs two different answers")
            if (other.tenant, other.username, other.adapter) != (this.tenant, this.username, this.adapter):
                raise InvalidArgumentError("both responses of a choice must come from the same adapter")
            if _prompt_messages(other) != _prompt_messages(this):
                raise InvalidArgumentError("both responses of a choice must answer the same prompt")
            if other.response == this.response:
                raise InvalidArgumentError("the two responses are identical; there is nothing to prefer")
            chosen, rejected = (this, other) if preferred == "this" else (other, this)
            kind, method = "choice", "dpo"
            record = {"prompt": _prompt_messages(this), "chosen": chosen.response, "rejected": rejected.response}
        elif rating == 1:
            if not this.response.strip():
                raise InvalidArgumentError("the rated response is empty; it cannot become an example")
            method = "sft"
            record = {"messages": [*_prompt_messages(this), {"role": "assistant", "content": this.response}]}
        with db.write_tx(self.engine) as conn:
            fid = conn.execute(feedback.insert().values(
                tenant=this.tenant, username=this.username, adapter=this.adapter, response_id=this.response_id,
                kind=kind, rating=rating, method=method, record=record, created_at=utcnow(),
            ).returning(feedback.c.id)).scalar_one()
            self._trim(conn, feedback, this.tenant, this.username, self.max_feedback)
            row = conn.execute(sa.select(feedback).where(feedback.c.id == fid)).first()
        return _feedback(row)

    def _visible(self, response_id: str, tenant: str | None):
        missing = NotFoundError(f"response {response_id!r} was not captured (capture is off for its adapter, it "
                                "was trimmed, or it does not exist)")
        if not isinstance(response_id, str) or not 1 <= len(response_id) <= 64:
            raise missing
        with db.read_tx(self.engine) as conn:
            row = conn.execute(sa.select(interactions).where(interactions.c.response_id == response_id)).first()
        if row is None or (tenant is not None and row.tenant != tenant):
            raise missing
        return row

    def examples(self, ref: str, *, after: int = 0, upto: int | None = None) -> list[dict]:
        """Feedback that became training examples (``method`` sft/dpo), ids in ``(after, upto]``, oldest first."""
        tenant, user, name = parse_ref(ref)
        stmt = sa.select(feedback).where(
            feedback.c.tenant == tenant, feedback.c.username == user, feedback.c.adapter == name,
            feedback.c.method.is_not(None), feedback.c.id > after).order_by(feedback.c.id)
        if upto is not None:
            stmt = stmt.where(feedback.c.id <= upto)
        with db.read_tx(self.engine) as conn:
            return [_feedback(r) for r in conn.execute(stmt)]

    # ---------------------------------------------------------------- show / export

    def _user_rows(self, tenant: str, user: str, limit: int | None = None) -> tuple[list[dict], list[dict]]:
        check_segment(tenant, "tenant")
        check_segment(user, "user")
        out = []
        with db.read_tx(self.engine) as conn:
            for table, conv in ((interactions, _interaction), (feedback, _feedback)):
                stmt = sa.select(table).where(table.c.tenant == tenant, table.c.username == user).order_by(table.c.id)
                if limit is not None:
                    stmt = stmt.limit(limit)
                out.append([conv(r) for r in conn.execute(stmt)])
        return out[0], out[1]

    def show(self, tenant: str, user: str) -> dict:
        """What is stored about a user: counts and time spans per adapter, and each adapter's settings."""
        inter, fb = self._user_rows(tenant, user)
        with db.read_tx(self.engine) as conn:
            names = conn.execute(sa.select(adapters.c.name).where(
                adapters.c.tenant == tenant, adapters.c.username == user).order_by(adapters.c.name)).scalars().all()
        per: dict[str, dict] = {}
        for name in names:
            per[name] = {"interactions": 0, "feedback": 0, "examples": 0, "first": None, "last": None,
                         "settings": self.settings(f"{tenant}/{user}/{name}").to_dict()}
        for rows, what in ((inter, "interactions"), (fb, "feedback")):
            for r in rows:
                name = r["ref"].rsplit("/", 1)[1]
                entry = per.setdefault(name, {"interactions": 0, "feedback": 0, "examples": 0, "first": None,
                                              "last": None, "settings": None})
                entry[what] += 1
                if what == "feedback" and r["method"]:
                    entry["examples"] += 1
                entry["first"] = min(filter(None, (entry["first"], r["created_at"])))
                entry["last"] = max(filter(None, (entry["last"], r["created_at"])))
        return {"user": f"{tenant}/{user}", "adapters": per, "interactions": len(inter), "feedback": len(fb)}

    def export(self, tenant: str, user: str) -> dict:
        """Everything captured from a user (their interactions and feedback), as JSON-ready dicts."""
        inter, fb = self._user_rows(tenant, user)
        return {"user": f"{tenant}/{user}", "exported_at": utcnow().isoformat(), "interactions": inter,
                "feedback": fb}

    # ---------------------------------------------------------------- forget

    def forget_rows(self, tenant: str, user: str, *, actor: str = "cli",
                    extra_digests=()) -> tuple[dict, list[str]]:
        """The registry's part of forgetting (see the module docstring), in one write transaction: every row of
        the user and every blob only they referenced, plus those of ``extra_digests`` (blobs the user's data
        produced outside any row, e.g. Tinker's ephemeral samplers) nobody references. Returns the counts and
        the digests deleted (for the caches to purge)."""
        check_segment(tenant, "tenant")
        check_segment(user, "user")
        postgres = self.engine.dialect.name == "postgresql"
        with db.write_tx(self.engine) as conn:
            if postgres:  # exclusive with commits' shared lock: no commit can re-reference a blob we delete
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(db.GC_LOCK_KEY)))
            stmt = sa.select(adapters.c.id, adapters.c.name).where(adapters.c.tenant == tenant,
                                                                   adapters.c.username == user)
            arows = conn.execute(stmt.with_for_update() if postgres else stmt).all()
            ids = [r.id for r in arows]
            refs = [f"{tenant}/{user}/{r.name}" for r in arows]
            digests = set(conn.execute(sa.select(revisions.c.digest).where(revisions.c.adapter_id.in_(ids))).scalars())
            digests.update(d for d in extra_digests if d)
            n_revisions = conn.execute(sa.select(sa.func.count()).select_from(revisions)
                                       .where(revisions.c.adapter_id.in_(ids))).scalar_one()
            # Jobs by ref prefix, not only by the adapters found: a job row outlives nothing, but be exhaustive.
            job_of_user = jobs.c.ref.startswith(f"{tenant}/{user}/", autoescape=True)
            job_rows = conn.execute(sa.select(jobs.c.id, jobs.c.dataset_digest, jobs.c.checkpoint_digest)
                                    .where(job_of_user)).all()
            for j in job_rows:
                digests.update(d for d in (j.dataset_digest, j.checkpoint_digest) if d)
            counts = {"adapters": len(ids), "revisions": n_revisions, "jobs": len(job_rows)}
            for table in user_owned_tables():
                counts[table.name] = conn.execute(table.delete().where(
                    table.c.tenant == tenant, table.c.username == user)).rowcount
            # Another user's adapter stacked on one of these (rare: a person is usually a leaf) loses that parent:
            # its parent_ref would name the forgotten user and point at nothing.
            others = sa.and_(adapters.c.parent_ref.in_(refs), adapters.c.id.not_in(ids))
            counts["children_unlinked"] = conn.execute(adapters.update().where(others).values(parent_ref=None)).rowcount
            conn.execute(jobs.delete().where(job_of_user))
            for table in adapter_owned_tables():
                conn.execute(table.delete().where(table.c.adapter_id.in_(ids)))
            conn.execute(adapters.delete().where(adapters.c.id.in_(ids)))
            reason = (f"forgot user {tenant}/sha256:{user_hash(tenant, user)}: {counts['adapters']} adapter(s), "
                      f"{counts['revisions']} revision(s), {counts['interactions']} interaction(s), "
                      f"{counts['feedback']} feedback")
            entry = conn.execute(audit.insert().values(
                adapter_id=0, ref=f"{tenant}/sha256:{user_hash(tenant, user)}", action=FORGET_ACTION, alias=None,
                from_number=None, to_number=None, actor=actor, reason=reason, at=utcnow())).inserted_primary_key[0]
            # Last, still under the lock: blobs nobody else references. Another user's revision or job that shares
            # a digest keeps it (it is theirs now, referenced only by them).
            shared = _referenced(conn, sorted(digests)) if digests else set()
            deleted = sorted(digests - shared)
            for digest in deleted:
                self.registry.blobs.delete(digest)
        db.truncate_wal(self.engine)  # the WAL still holds the pages as they were before the deletion
        log.info("forgot %s/%s: %s; %d blob(s) deleted, %d shared kept", tenant, "<user>", counts, len(deleted),
                 len(shared))
        return {**counts, "blobs_deleted": len(deleted), "blobs_shared_kept": len(shared), "audit_id": entry}, deleted


def adapter_owned_tables() -> list[sa.Table]:
    """Every table whose rows belong to one adapter (an ``adapter_id`` column), children before ``adapters``:
    forgetting deletes their rows of the user's adapters. A new such table is found here without a code change."""
    return [t for t in reversed(metadata.sorted_tables) if t is not adapters and "adapter_id" in t.c
            and t is not audit] + [audit]


def user_owned_tables() -> list[sa.Table]:
    """Every table other than ``adapters`` keyed by ``(tenant, username)`` (interactions, feedback, schedules, and
    any later one): forgetting deletes the user's rows of each."""
    return [t for t in metadata.sorted_tables if t is not adapters and {"tenant", "username"} <= set(t.c.keys())]
