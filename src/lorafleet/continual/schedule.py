"""Scheduled personal updates: feedback becomes training data, a new revision, an evaluation, a gate decision.

::

    feedback ids > watermark ("new examples")          older examples (ids <= watermark)
        │  every k-th one held out (id % k == 0)            │ replay sample (against forgetting)
        ▼                                                   ▼
    dataset = new (not held out) + replay ──► job (warm start from live, provenance names the window)
        ──► worker trains ──► candidate #N
        ──► evaluate: the window's eval set (held-out feedback, or the policy's persona) with the probe,
                      + every earlier eval set of the user (their habits), candidate and live side by side
        ──► gate (drift guard included) ──► live, or refused with the reason in the audit log

A policy per adapter (:class:`UpdatePolicy`) says when: at least ``min_examples`` new examples, or
``every_hours`` since the last update with at least one. The :class:`Scheduler` is run by the worker
(``Worker(hooks=[scheduler.tick])``), so evaluation shares the worker's resident base.

Held-out membership is a property of a feedback id (``id % k == 0``, ``k = round(1 / holdout)``), so a held-out
example is never replayed into training later. Each candidate records its eval set and the user's habits so far
in ``metrics["habits"]`` (descriptors that rebuild the eval sets), so the drift guard keeps working after
retention removed old revisions.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta

from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.gate import GateConfig, gate
from lorafleet.evaluation.generation import Backend
from lorafleet.evaluation.personas import Persona, get_persona
from lorafleet.registry import InvalidArgumentError, NotFoundError
from lorafleet.registry.memory import MemorySettings, MemoryStore
from lorafleet.training.data import dataset_from_records

log = logging.getLogger(__name__)

MAX_HABITS = 8  # earlier eval sets the drift guard checks (the newest)
MAX_EVAL_RECORDS = 64  # held-out feedback records kept on a revision to rebuild its eval set


class PolicyError(InvalidArgumentError):
    """An update policy is invalid; the message names the field."""


@dataclass(frozen=True)
class UpdatePolicy:
    """When and how an adapter is retrained from its user's feedback."""

    min_examples: int = field(default=16, metadata={"help": "retrain when at least this many new examples arrived"})
    every_hours: float | None = field(default=None, metadata={"help": "...or when this long passed (>= 1 new example)"})
    replay: float = field(default=1.0, metadata={"help": "older examples replayed per new training example"})
    replay_max: int = field(default=256, metadata={"help": "cap on replayed examples per update"})
    holdout: float = field(default=0.2, metadata={"help": "share of feedback held out for evaluation (0 = none)"})
    method: str = field(default="auto", metadata={"help": "auto (sft if any SFT example, else dpo) | sft | dpo"})
    warm_start: str = field(default="live", metadata={"help": "live (continue the live revision) | none"})
    steps: int = field(default=20, metadata={"help": "optimizer steps per update"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    rank: int = field(default=8, metadata={"help": "LoRA rank (a warm start keeps live's shape)"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default 2 x rank)"})
    targets: str = field(default="all", metadata={"help": "LoRA target modules"})
    batch_size: int = field(default=4, metadata={"help": "rows per step"})
    max_len: int = field(default=256, metadata={"help": "tokens per example"})
    seed: int = field(default=0, metadata={"help": "training and replay-sampling seed"})
    eval_persona: dict | str | None = field(default=None, metadata={
        "help": "a persona (name or spec) whose habit this feedback teaches: evaluates adherence; default: the "
                "held-out feedback (held-out loss)"})
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate on at most this many prompts per set"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens generated per eval prompt"})
    probe: bool = field(default=True, metadata={"help": "run the competence probe on candidates"})
    gate: dict = field(default_factory=dict, metadata={"help": "GateConfig overrides, e.g. {'max_habit_drop': 0.1}"})

    def __post_init__(self) -> None:
        def num(x) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        def whole(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        checks = {
            "min_examples": whole(self.min_examples) and self.min_examples >= 1,
            "every_hours": self.every_hours is None or (num(self.every_hours) and 0 < self.every_hours <= 87_600),
            "replay": num(self.replay) and 0 <= self.replay <= 100,
            "replay_max": whole(self.replay_max) and self.replay_max >= 0,
            "holdout": num(self.holdout) and 0 <= self.holdout <= 0.5,
            "method": self.method in ("auto", "sft", "dpo"),
            "warm_start": self.warm_start in ("live", "none"),
            "steps": whole(self.steps) and 1 <= self.steps <= 100_000,
            "lr": num(self.lr) and 0 < self.lr <= 1,
            "rank": whole(self.rank) and 1 <= self.rank <= 64,
            "alpha": self.alpha is None or (num(self.alpha) and self.alpha > 0),
            "targets": isinstance(self.targets, str) and 0 < len(self.targets) <= 200,
            "batch_size": whole(self.batch_size) and 1 <= self.batch_size <= 256,
            "max_len": whole(self.max_len) and 8 <= self.max_len <= 8192,
            "seed": whole(self.seed) and self.seed >= 0,
            "eval_persona": self.eval_persona is None or isinstance(self.eval_persona, str | dict),
            "eval_limit": self.eval_limit is None or (whole(self.eval_limit) and self.eval_limit >= 1),
            "max_new_tokens": whole(self.max_new_tokens) and 1 <= self.max_new_tokens <= 512,
            "probe": isinstance(self.probe, bool),
            "gate": isinstance(self.gate, dict),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise PolicyError(f"invalid update policy field(s) {bad}: got {[getattr(self, k) for k in bad]}; "
                              "see `lorafleet schedule set --help`")
        if self.eval_persona is not None:
            self.persona()  # a bad persona fails here, not in the worker
        self.gate_config()

    @classmethod
    def from_dict(cls, data: dict | None) -> UpdatePolicy:
        data = dict(data or {})
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise PolicyError(f"unknown update policy field(s) {sorted(unknown)}; known: "
                              f"{[f.name for f in fields(cls)]}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    def persona(self):
        try:
            if isinstance(self.eval_persona, dict):
                return Persona.from_dict(self.eval_persona)
            return get_persona(self.eval_persona) if self.eval_persona else None
        except (EvaluationError, TypeError, KeyError, ValueError, AttributeError) as exc:
            raise PolicyError(f"eval_persona {self.eval_persona!r} is not a usable persona: {exc}") from None

    def gate_config(self):
        try:  # without the probe the gate cannot require it
            return GateConfig(**{**({} if self.probe else {"require_probe": False}), **self.gate})
        except (TypeError, EvaluationError) as exc:
            raise PolicyError(f"gate overrides {self.gate!r} are invalid: {exc}") from None

    @property
    def holdout_every(self) -> int:
        """Feedback ids divisible by this are held out (0 = none held out)."""
        return 0 if self.holdout <= 0 else max(2, round(1 / self.holdout))


# ------------------------------------------------------------------------------------------ datasets


def _as(method: str, example: dict) -> dict | None:
    """A feedback example as a record of ``method`` (a DPO pair trains SFT on its chosen answer), or None."""
    record = example["record"]
    if example["method"] == method:
        return record
    if method == "sft" and example["method"] == "dpo":
        prompt = record["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return {"messages": [*messages, {"role": "assistant", "content": record["chosen"]}]}
    return None


def is_heldout(feedback_id: int, policy: UpdatePolicy) -> bool:
    k = policy.holdout_every
    return bool(k) and feedback_id % k == 0


@dataclass
class UpdatePlan:
    """What one update trains on and evaluates with."""

    method: str
    train: list[dict]
    replay: list[dict]
    heldout: list[dict]
    window: dict


def plan_update(memory: MemoryStore, settings: MemorySettings, policy: UpdatePolicy) -> UpdatePlan | None:
    """The dataset of the next update from the feedback after the watermark, or None without a new example."""
    new = memory.examples(settings.ref, after=settings.watermark)
    if not new:
        return None
    method = policy.method
    if method == "auto":
        method = "sft" if any(e["method"] == "sft" for e in new) else "dpo"
    fresh = [e for e in new if not is_heldout(e["id"], policy)]
    heldout = [e for e in new if is_heldout(e["id"], policy)]
    train = [r for r in (_as(method, e) for e in fresh) if r is not None]
    if not train:
        return None
    older = [e for e in memory.examples(settings.ref, upto=settings.watermark) if not is_heldout(e["id"], policy)]
    older_records = [r for r in (_as(method, e) for e in older) if r is not None]
    k = min(len(older_records), math.ceil(policy.replay * len(train)), policy.replay_max)
    replay = random.Random(policy.seed * 1_000_003 + new[-1]["id"]).sample(older_records, k) if k else []
    window = {
        "feedback_ids": [new[0]["id"], new[-1]["id"]],
        "from": new[0]["created_at"], "to": new[-1]["created_at"],
        "new_examples": len(train), "heldout_examples": len(heldout), "replay_examples": len(replay),
        "replayed_from_ids_upto": settings.watermark, "method": method,
    }
    return UpdatePlan(method, train, replay, [r for r in (_as("sft", e) for e in heldout) if r is not None], window)


def due(settings: MemorySettings, policy: UpdatePolicy, new_count: int, now: datetime) -> str | None:
    """Why an update is due now (None: it is not)."""
    if new_count >= policy.min_examples:
        return f"{new_count} new example(s) >= {policy.min_examples}"
    if policy.every_hours is not None and new_count >= 1:
        last = settings.last_run_at
        if last is None or now - last >= timedelta(hours=policy.every_hours):
            return f"{policy.every_hours} h since the last update, {new_count} new example(s)"
    return None


# ------------------------------------------------------------------------------------------ eval sets


def describe_eval_set(es) -> dict:
    """A descriptor that rebuilds ``es`` later (persona spec, file, or the records themselves)."""
    out = {"eval_set": es.name, "eval_digest": es.digest}
    if es.persona is not None:
        out["persona_spec"] = es.persona.to_dict()
    elif es.path is not None:
        out["eval_file"] = es.path
    else:
        out["eval_records"] = es.records[:MAX_EVAL_RECORDS]
    return out


def eval_set_from(desc: dict):
    """Rebuild an eval set from a descriptor (or a revision's metrics); None if it cannot be rebuilt."""
    from pathlib import Path  # noqa: PLC0415

    from lorafleet.evaluation.metrics import EvalSet  # noqa: PLC0415 - defers torch

    try:
        if isinstance(desc.get("persona_spec"), dict):
            return EvalSet.from_persona(Persona.from_dict(desc["persona_spec"]))
        if desc.get("eval_records"):
            return EvalSet(str(desc.get("eval_set") or "feedback"), list(desc["eval_records"]))
        if desc.get("eval_file") and Path(desc["eval_file"]).is_file():
            return EvalSet.from_file(desc["eval_file"])
    except Exception as exc:  # noqa: BLE001 - an unreadable old eval set is skipped, and logged
        log.warning("earlier eval set %s cannot be rebuilt: %s", desc.get("eval_set"), exc)
    return None


def user_habits(registry, ref: str, *, exclude_digest: str | None = None) -> list:
    """The user's earlier eval sets (newest first, at most ``MAX_HABITS``), from the revisions' metrics: each
    revision's own eval set and the habits it carried forward."""
    seen, out = {exclude_digest}, []
    for rev in reversed(registry.history(ref)):
        m = rev.provenance.metrics
        for desc in [m, *(m.get("habits") or [])]:
            digest = desc.get("eval_digest")
            if not digest or digest in seen:
                continue
            seen.add(digest)
            es = eval_set_from(desc)
            if es is not None and es.digest not in {exclude_digest, *(e.digest for e in out)}:
                out.append(es)
    return out[:MAX_HABITS]


def _limit(es, n: int | None):
    from lorafleet.evaluation.metrics import EvalSet  # noqa: PLC0415 - defers torch

    if n is None or len(es) <= n:
        return es
    return EvalSet(es.name, es.records[:n], persona=es.persona, path=es.path)


# ------------------------------------------------------------------------------------------ the scheduler


class Scheduler:
    """Submits due updates and carries finished ones through evaluation and the gate. ``tick`` is cheap when
    nothing is due (one query per scheduled adapter); run it from the worker loop."""

    def __init__(self, registry, base, *, memory: MemoryStore | None = None, min_interval_s: float = 0.0,
                 clock=lambda: datetime.now(UTC), backend: Backend | None = None) -> None:
        from lorafleet.training.jobs import JobQueue  # noqa: PLC0415 - defers torch

        self.registry = registry
        self.base = base
        self.memory = memory or MemoryStore(registry)
        self.queue = JobQueue(registry)
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.backend = backend  # evaluation's generation (None: the default in-process generate)
        self._last_tick = 0.0

    def tick(self) -> list[dict]:
        """One pass over the scheduled adapters; returns what happened (one event per action)."""
        if time.monotonic() - self._last_tick < self.min_interval_s:
            return []
        self._last_tick = time.monotonic()
        events = []
        for settings in self.memory.scheduled():
            try:
                event = self._finish(settings) if settings.pending_job else self._maybe_submit(settings)
            except NotFoundError as exc:  # the adapter was deleted or forgotten meanwhile
                event = {"ref": settings.ref, "event": "skipped", "reason": str(exc)}
            except Exception as exc:  # noqa: BLE001 - one adapter's failure must not stop the worker loop
                log.exception("schedule %s failed", settings.ref)
                event = {"ref": settings.ref, "event": "error", "error": f"{type(exc).__name__}: {exc}"}
                self.memory.update_schedule_state(settings.ref, pending_job=None, pending_watermark=None,
                                                  last_result={"state": "error", "error": event["error"]})
            if event is not None:
                log.info("schedule %s: %s", settings.ref, event)
                events.append(event)
        return events

    def _maybe_submit(self, settings: MemorySettings) -> dict | None:
        from lorafleet.adapters import LoraSpec  # noqa: PLC0415 - defers torch
        from lorafleet.training.trainer import TrainConfig  # noqa: PLC0415 - defers torch

        policy = UpdatePolicy.from_dict(settings.policy)
        now = self.clock()
        new_count = len(self.memory.examples(settings.ref, after=settings.watermark))
        why = due(settings, policy, new_count, now)
        if why is None:
            return None
        plan = plan_update(self.memory, settings, policy)
        if plan is None:
            return None
        dataset = dataset_from_records(plan.train + plan.replay, plan.method, source=f"feedback of {settings.ref}")
        spec = LoraSpec(rank=policy.rank, alpha=policy.alpha or 2.0 * policy.rank, target_modules=policy.targets)
        config = TrainConfig(method=plan.method, steps=policy.steps, lr=policy.lr, batch_size=policy.batch_size,
                             max_len=policy.max_len, seed=policy.seed)
        job = self.queue.submit(settings.ref, dataset, spec, config, creator="scheduler",
                                warm_start=policy.warm_start, provenance={"window": plan.window})
        self.memory.update_schedule_state(
            settings.ref, pending_job=job.id, pending_watermark=plan.window["feedback_ids"][1], last_run_at=now,
            last_result={"state": "training", "job": job.id, "why": why, "window": plan.window})
        return {"ref": settings.ref, "event": "submitted", "job": job.id, "why": why, "window": plan.window}

    def _finish(self, settings: MemorySettings) -> dict | None:
        try:
            job = self.queue.get(settings.pending_job)
        except NotFoundError:
            job = None
        if job is not None and job.state in ("queued", "running"):
            return None
        if job is None or job.state != "succeeded":
            state = job.state if job else "missing"
            result = {"state": state, "job": settings.pending_job, "error": job.error if job else "job vanished"}
            self.memory.update_schedule_state(settings.ref, pending_job=None, pending_watermark=None,
                                              last_result=result)
            return {"ref": settings.ref, "event": f"job {state}", **result}
        policy = UpdatePolicy.from_dict(settings.policy)
        address = f"{settings.ref}#{job.result_number}"
        decision = self.evaluate_and_gate(settings, policy, address)
        result = {"state": "promoted" if decision.promoted else "refused", "job": job.id, "revision": address,
                  "reason": decision.reason, "audit_id": decision.audit_id,
                  "window": self.registry.resolve(address).provenance.hyperparams.get("window")}
        self.memory.update_schedule_state(settings.ref, watermark=settings.pending_watermark, pending_job=None,
                                          pending_watermark=None, last_result=result)
        return {"ref": settings.ref, "event": result["state"], **result}

    def primary_eval_set(self, settings: MemorySettings, policy: UpdatePolicy, upto: int):
        """The window's eval set: the policy's persona, else the window's held-out feedback."""
        from lorafleet.evaluation.metrics import EvalSet  # noqa: PLC0415 - defers torch

        persona = policy.persona()
        if persona is not None:
            return EvalSet.from_persona(persona)
        held = [e for e in self.memory.examples(settings.ref, after=settings.watermark, upto=upto)
                if is_heldout(e["id"], policy)]
        records = [r for r in (_as("sft", e) for e in held) if r is not None]
        if not records:  # nothing held out (tiny window or holdout 0): the window's own examples
            records = [r for r in (_as("sft", e) for e in self.memory.examples(
                settings.ref, after=settings.watermark, upto=upto)) if r is not None]
        first = held[0]["id"] if held else settings.watermark + 1
        return EvalSet(f"feedback:{settings.ref}:{first}-{upto}", records[:MAX_EVAL_RECORDS])

    def in_context_baseline(self, settings: MemorySettings, policy: UpdatePolicy, primary, cand, cand_m: dict):
        """The in-context baseline on the window's eval set (the gate reports it; ``require_in_context_margin``
        enforces it): the persona's description plus up to k of the user's own training feedback in the prompt.
        None where there is no checker (no persona) or no training feedback to show."""
        from lorafleet.evaluation.baselines import DEFAULT_K, BaselineConfig, Profile, compare_conditions  # noqa: PLC0415 - defers torch

        if primary.persona is None:
            return None
        examples = [r for r in (_as("sft", e) for e in self.memory.examples(settings.ref, upto=settings.pending_watermark)
                                if not is_heldout(e["id"], policy)) if r is not None]
        if not examples:
            return None
        config = BaselineConfig(conditions=("base", "in_context", "adapter"), k=min(DEFAULT_K, len(examples)),
                                probe=False, serving=False, fit_k=True)
        profile = Profile(primary.persona.describe(), tuple(examples))
        return compare_conditions(self.base, [{"eval_set": primary, "profile": profile, "adapter": cand,
                                               "metrics": cand_m}], config, max_new_tokens=policy.max_new_tokens,
                                  backend=self.backend)[0]

    def evaluate_and_gate(self, settings: MemorySettings, policy: UpdatePolicy, address: str):
        """Evaluate candidate ``address`` (and live, side by side) on the window's eval set and on every earlier
        eval set of the user, store the metrics on the candidate, and run the gate (drift guard included)."""
        from lorafleet.adapters import from_bytes  # noqa: PLC0415 - defers torch
        from lorafleet.evaluation.metrics import evaluate_adapters  # noqa: PLC0415 - defers torch

        primary = _limit(self.primary_eval_set(settings, policy, settings.pending_watermark), policy.eval_limit)
        earlier, seen = [], {primary.digest}
        for es in user_habits(self.registry, settings.ref, exclude_digest=primary.digest):
            es = _limit(es, policy.eval_limit)  # the same limit every time: the same digest every time
            if es.digest not in seen:
                seen.add(es.digest)
                earlier.append(es)
        fp = self.base.fingerprint
        cand_rev, blob = self.registry.load(address, base_fingerprint=fp)
        cand = from_bytes(blob, self.base)
        try:
            live_rev, live_blob = self.registry.load(f"{settings.ref}@live", base_fingerprint=fp)
            live = from_bytes(live_blob, self.base)
            ref_name = f"live #{live_rev.number}"
        except NotFoundError:
            live_rev = live = None
            ref_name = "base"
        kw = {"max_new_tokens": policy.max_new_tokens, "backend": self.backend}
        (cand_m,) = evaluate_adapters(self.base, [cand], [primary], probe_enabled=policy.probe, **kw)
        sides = ([live] if live is not None else []) + [cand] * len(earlier) + [live] * len(earlier)
        sets = ([primary] if live is not None else []) + earlier + earlier
        side_m = evaluate_adapters(self.base, sides, sets, probe_enabled=False, **kw) if sides else []
        live_on_primary = side_m.pop(0) if live is not None else None
        drift = []
        for es, c, r in zip(earlier, side_m[: len(earlier)], side_m[len(earlier):], strict=True):
            drift.append({"eval_set": es.name, "eval_digest": es.digest, "adherence": c["adherence"],
                          "eval_loss": c["eval_loss"], "reference": ref_name,
                          "ref_adherence": r["adherence"] if live is not None else r["base_adherence"],
                          "ref_eval_loss": r["eval_loss"] if live is not None else r["base_eval_loss"]})
        habits = [describe_eval_set(es) for es in [primary, *earlier]][: MAX_HABITS + 1]
        ref_side = live_on_primary or {"adherence": cand_m["base_adherence"], "eval_loss": cand_m["base_eval_loss"]}
        cand_m.update({**describe_eval_set(primary), "drift": drift, "habits": habits,
                       "window": cand_rev.provenance.hyperparams.get("window"),
                       "reference": {"name": ref_name, "adherence": ref_side["adherence"],
                                     "eval_loss": ref_side["eval_loss"]}})
        cand_m["baselines"] = self.in_context_baseline(settings, policy, primary, cand, cand_m)
        self.registry.update_metrics(address, cand_m)

        def evaluate_live(_rev, _digest):  # live on the candidate's eval set, measured above
            return live_on_primary

        return gate(self.registry, address, config=policy.gate_config(), actor="scheduler", evaluate=evaluate_live)
