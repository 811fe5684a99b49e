"""After a parent moves: re-evaluate the members of its stack and flag those the move hurt (a report only).

Promoting an organisation's adapter changes what every member is served (each level resolves its own ``live``).
:func:`stack_report` finds the members whose live revision was measured (or trained) on other parent revisions
than the ones live now, re-evaluates them together on their own eval sets on top of the current parents, and
flags a member when, against the metrics it had before the move:

* the competence probe now fails the gate's thresholds (``max_ppl_ratio`` / ``min_probe_retention``), or
* its habit adherence fell by more than the gate's ``adherence_margin`` (or is under ``min_adherence``), or
* without a habit checker, its held-out loss rose by more than ``loss_margin``.

Nothing moves: no alias changes, the member's gate metrics stay as they were; each check is merged into the
member revision's ``metrics["stack_check"]`` (with the parents before and now) for the record. What to do with a
flagged member — retrain it on the new stack, or roll the parent back — is a decision for a person.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.gate import GateConfig
from lorafleet.evaluation.generation import Backend
from lorafleet.registry.stacks import stack_record

OK, FLAGGED, UNCHANGED, NO_LIVE, NO_EVAL = "ok", "flagged", "unchanged", "no live revision", "not evaluable"
COMPARED = ("adherence", "eval_loss", "probe_ppl_ratio", "probe_retention")


@dataclass(frozen=True)
class MemberCheck:
    """One member of a stack after its parents moved."""

    ref: str
    revision: str | None  # the member's live revision
    status: str  # ok | flagged | unchanged | no live revision | not evaluable
    reason: str
    parents_before: list[dict] = field(default_factory=list)  # what its metrics were measured (or trained) on
    parents_now: list[dict] = field(default_factory=list)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        return self.status == FLAGGED

    def to_dict(self) -> dict:
        return asdict(self)


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def judge(before: dict, after: dict, config: GateConfig = GateConfig()) -> tuple[bool, str]:
    """``(flag?, reason)`` for a member measured ``before`` and ``after`` its parents moved (see module doc)."""
    ratio, kept = _num(after.get("probe_ppl_ratio")), _num(after.get("probe_retention"))
    if ratio is not None and ratio > config.max_ppl_ratio:
        return True, f"competence probe fails on the new stack: perplexity x{ratio:.3f} > x{config.max_ppl_ratio:.3f}"
    if kept is not None and kept < config.min_probe_retention:
        return True, f"competence probe fails on the new stack: kept {kept:.0%} < {config.min_probe_retention:.0%}"
    adh, adh0 = _num(after.get("adherence")), _num(before.get("adherence"))
    loss, loss0 = _num(after.get("eval_loss")), _num(before.get("eval_loss"))
    if adh is not None:
        if adh < config.min_adherence:
            return True, f"adherence {adh:.2f} is below the floor {config.min_adherence:.2f}"
        if adh0 is None:
            return False, f"adherence {adh:.2f} on the new stack (no earlier adherence to compare)"
        if adh0 - adh > config.adherence_margin + 1e-12:
            return True, f"adherence fell {adh0:.2f} -> {adh:.2f} (more than {config.adherence_margin:.2f})"
        return False, f"adherence {adh0:.2f} -> {adh:.2f}"
    if loss is not None and loss0 is not None:
        if loss - loss0 > config.loss_margin + 1e-12:
            return True, f"held-out loss rose {loss0:.4f} -> {loss:.4f} (more than {config.loss_margin:.4f})"
        return False, f"held-out loss {loss0:.4f} -> {loss:.4f}"
    return False, "no earlier metrics to compare with"


def _parents_of(rev) -> list[dict]:
    """The parent levels ``rev``'s metrics were measured on, else those it was trained on."""
    stack = rev.provenance.metrics.get("stack")
    if isinstance(stack, list) and stack:
        return stack[:-1]
    return list(rev.provenance.hyperparams.get("stack_parents") or [])


def stack_report(registry, base, ref: str, *, config: GateConfig = GateConfig(), everyone: bool = False,
                 store: bool = True, manifest=None, actor: str = "stack-report",
                 on_batch: Callable[[int], None] | None = None, backend: Backend | None = None) -> list[MemberCheck]:
    """Check every member stacked on ``ref`` (children and grandchildren); see the module docstring. ``backend``
    generates (None: the default in-process generate).

    ``everyone`` re-evaluates members whose parents did not move too. Members are evaluated together (shared
    batches); the base's side of each eval set is cached as in :func:`evaluate_adapters`.
    """
    from lorafleet.evaluation.metrics import eval_set_for, evaluate_adapters, load_for_eval  # noqa: PLC0415 - defers torch

    out: dict[str, MemberCheck] = {}
    todo = []  # (member ref, live revision, adapter, eval set, parents before, parents now)
    for member in registry.stack_members(ref):
        if "live" not in member.aliases:
            out[member.ref] = MemberCheck(member.ref, None, NO_LIVE, "nothing is served for it yet")
            continue
        live = registry.resolve(f"{member.ref}@live")
        before = _parents_of(live)
        now = stack_record(registry.resolve_stack(live.address))[:-1]
        if not everyone and [p.get("digest") for p in before] == [p["digest"] for p in now]:
            out[member.ref] = MemberCheck(member.ref, live.address, UNCHANGED, "its parents did not move", before, now)
            continue
        try:
            es = eval_set_for(live, manifest=manifest)
        except EvaluationError as exc:
            out[member.ref] = MemberCheck(member.ref, live.address, NO_EVAL, str(exc), before, now)
            continue
        _, adapter, _ = load_for_eval(registry, live.address, base)
        todo.append((member.ref, live, adapter, es, before, now))
    if todo:
        max_new = max(int(live.provenance.metrics.get("max_new_tokens") or 48) for _, live, *_ in todo)
        results = evaluate_adapters(base, [t[2] for t in todo], [t[3] for t in todo], max_new_tokens=max_new,
                                    on_batch=on_batch, backend=backend)
        for (member_ref, live, _, es, before, now), m in zip(todo, results, strict=True):
            old = live.provenance.metrics
            same_set = old.get("eval_digest") == es.digest
            prior = {k: old.get(k) for k in COMPARED} if same_set else {}
            flag, why = judge(prior, m, config)
            check = MemberCheck(member_ref, live.address, FLAGGED if flag else OK, why, before, now, prior,
                                {k: m.get(k) for k in COMPARED})
            out[member_ref] = check
            if store:
                registry.update_metrics(live.address, {"stack_check": {
                    **check.to_dict(), "parent": ref, "actor": actor, "at": datetime.now(UTC).isoformat(),
                    "eval_digest": es.digest, "gate_config": config.to_dict()}})
    return [out[k] for k in sorted(out)]
