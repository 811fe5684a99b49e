"""The promotion gate: a ``candidate`` revision becomes ``live`` only when it is better for its user.

The rule (:func:`decide`, thresholds in :class:`GateConfig`), applied to metrics measured on the *same* eval
set (same ``eval_digest``):

1. **Competence holds**: ``probe_ppl_ratio <= max_ppl_ratio`` (1.5) and ``probe_retention >= min_probe_retention``.
2. **Better than the reference** (the current ``live`` revision; the base itself when nothing is live):
   - adherence up:   ``adherence - ref_adherence >= adherence_margin``, or
   - loss down at equal adherence: ``|adherence - ref_adherence| <= adherence_tolerance`` and
     ``ref_eval_loss - eval_loss >= loss_margin``.
   Without a habit checker (an eval file, no persona) only the loss rule applies.
3. Optionally ``adherence >= min_adherence``.
4. **In-context policy** (optional, ``require_in_context_margin``): when set, the candidate's adherence must
   reach the in-context baseline's (the base with the user's description and k of their examples in the prompt,
   measured by ``lorafleet eval`` in ``metrics["baselines"]``) within the margin, or it is refused: an adapter the
   prompt beats does not earn its bytes. Unset (the default) both numbers are still written into the reason, so
   the audit log records them, but nothing is enforced.
5. **Drift guard** (when the candidate carries ``metrics["drift"]``: the habits the user already had, i.e. their
   earlier eval sets, measured on the candidate and on the reference side by side — see
   :mod:`lorafleet.continual.schedule`): on every earlier set, adherence may fall at most ``max_habit_drop`` below
   the reference's, and (sets without a habit checker) held-out loss may rise at most ``max_habit_loss_rise``.
   A revision that learns the new preference but loses an old one is refused, the lost habit named in the reason.

A promotion moves ``live`` with the decision as the audit ``reason``. A refusal leaves ``live`` alone and
records the reason in the audit log by re-pointing ``candidate`` at the revision (an ``alias.set`` entry
whose ``reason`` starts with ``gate refused``); if ``candidate`` has already moved on to a newer revision it
is left there and the refusal is recorded on the alias ``refused`` instead. ``promote(..., force=True)``
skips the rule and is audited as ``forced``. Every decision is also merged into the revision's
``metrics["gate"]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from lorafleet.evaluation.errors import EvaluationError
from lorafleet.registry.errors import NotFoundError

LIVE, CANDIDATE, REFUSED = "live", "candidate", "refused"
DEFAULT_ACTOR = "gate"
REQUIRED = ("eval_digest", "eval_loss")
PROBE_KEYS = ("probe_ppl_ratio", "probe_retention")


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the promotion rule (see the module docstring)."""

    adherence_margin: float = field(default=0.05, metadata={"help": "adherence gain over the reference that wins outright"})
    adherence_tolerance: float = field(default=0.0, metadata={"help": "|adherence difference| counted as equal"})
    loss_margin: float = field(default=0.02, metadata={"help": "held-out loss drop (nats/token) that wins at equal adherence"})
    # A style adapter legitimately moves plain-prose perplexity by 10-40% (it was trained on chat turns only); a
    # damaged one by 1.7x and more (see docs/results/persona_gate.md).
    max_ppl_ratio: float = field(default=1.50, metadata={"help": "probe perplexity may grow at most this factor vs the base"})
    min_probe_retention: float = field(default=0.75, metadata={"help": "share of the base's correct probe answers kept"})
    min_adherence: float = field(default=0.0, metadata={"help": "absolute adherence floor (0 = none)"})
    require_probe: bool = field(default=True, metadata={"help": "refuse a revision whose probe was not run"})
    max_habit_drop: float = field(default=0.10, metadata={"help": "drift guard: adherence an earlier habit may lose"})
    max_habit_loss_rise: float = field(default=0.10, metadata={"help": "drift guard: held-out loss (nats/token) an "
                                                                       "earlier eval set without checker may gain"})
    require_in_context_margin: float | None = field(default=None, metadata={
        "help": "refuse a candidate whose adherence is below the in-context baseline's minus this (None = report only)"})

    def __post_init__(self) -> None:
        checks = {
            "adherence_margin": 0.0 <= self.adherence_margin <= 1.0,
            "adherence_tolerance": 0.0 <= self.adherence_tolerance < 1.0,
            "loss_margin": self.loss_margin >= 0.0,
            "max_ppl_ratio": self.max_ppl_ratio >= 1.0,
            "min_probe_retention": 0.0 <= self.min_probe_retention <= 1.0,
            "min_adherence": 0.0 <= self.min_adherence <= 1.0,
            "max_habit_drop": 0.0 <= self.max_habit_drop <= 1.0,
            "max_habit_loss_rise": self.max_habit_loss_rise >= 0.0,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
                raise EvaluationError(f"GateConfig.{name}={value!r} is out of range; see its help for the allowed values")
        m = self.require_in_context_margin
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)
                              or not 0.0 <= m <= 1.0):
            raise EvaluationError(f"GateConfig.require_in_context_margin={m!r} must be None or a number in [0, 1]")
        if self.adherence_margin and self.adherence_tolerance >= self.adherence_margin:
            raise EvaluationError("GateConfig.adherence_tolerance must be smaller than adherence_margin")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided for one revision, and on which numbers."""

    address: str
    promoted: bool
    reason: str
    reference: str  # "live #N", "base", or "-" (forced / already live)
    forced: bool = False
    candidate: dict = field(default_factory=dict)  # the candidate's deciding metrics
    reference_metrics: dict = field(default_factory=dict)
    audit_id: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


_DECIDING = ("eval_set", "eval_digest", "adherence", "eval_loss", "probe_ppl_ratio", "probe_retention")


def in_context_adherence(metrics: dict) -> float | None:
    """The in-context baseline's adherence stored by ``lorafleet eval`` (``metrics["baselines"]``), if measured."""
    report = metrics.get("baselines")
    row = (report.get("rows") or {}).get("in_context") if isinstance(report, dict) else None
    return _num(row.get("adherence")) if isinstance(row, dict) else None


def _pick(metrics: dict) -> dict:
    return {**{k: metrics.get(k) for k in _DECIDING}, "in_context_adherence": in_context_adherence(metrics)}


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def decide(candidate: dict, reference: dict, config: GateConfig = GateConfig(), *, reference_name: str = "live") -> tuple[bool, str]:
    """Apply the promotion rule. ``candidate`` holds the revision's metrics; ``reference`` holds
    ``adherence`` and ``eval_loss`` of what it must beat. Returns ``(promote?, reason)``; the reason also carries
    the in-context baseline's adherence when it was measured (rule 4: enforced only with
    ``require_in_context_margin``)."""
    ok, why = _decide(candidate, reference, config, reference_name=reference_name)
    if candidate.get("eval_digest") is None:
        return ok, why
    adh, ic, margin = _num(candidate.get("adherence")), in_context_adherence(candidate), config.require_in_context_margin
    if margin is None:
        return ok, why + (f"; in-context baseline adherence {ic:.2f} vs {adh:.2f} (reported, not enforced)"
                          if ic is not None and adh is not None else "")
    if adh is None:
        return False, f"{why}; in-context rule: no habit checker, so no adherence to compare with the prompt baseline"
    if ic is None:
        return False, (f"{why}; in-context rule: the in-context baseline was not measured; re-run "
                       "`lorafleet eval` with --baselines in_context")
    if adh < ic - margin - 1e-12:
        return False, (f"in-context rule: adherence {adh:.2f} is below the in-context baseline {ic:.2f} by "
                       f"{ic - adh:.2f} > margin {margin:.2f} (the prompt alone does better); {why}")
    return ok, f"{why}; in-context baseline adherence {ic:.2f} vs {adh:.2f} (within margin {margin:.2f})"


def _decide(candidate: dict, reference: dict, config: GateConfig, *, reference_name: str) -> tuple[bool, str]:
    missing = [k for k in REQUIRED if candidate.get(k) is None]
    if missing:
        return False, f"not evaluated (missing {missing}); run `lorafleet eval` first"
    notes = []
    if config.require_probe or any(candidate.get(k) is not None for k in PROBE_KEYS):
        ratio, kept = _num(candidate.get("probe_ppl_ratio")), _num(candidate.get("probe_retention"))
        if ratio is None or kept is None:
            return False, "competence probe missing; re-run `lorafleet eval` with the probe"
        if ratio > config.max_ppl_ratio:
            return False, f"competence probe failed: perplexity x{ratio:.3f} > x{config.max_ppl_ratio:.3f} of the base"
        if kept < config.min_probe_retention:
            return False, (f"competence probe failed: kept {kept:.0%} of the base's correct answers "
                           f"< {config.min_probe_retention:.0%}")
        notes.append(f"probe ok (ppl x{ratio:.3f}, retention {kept:.0%})")
    adh, ref_adh = _num(candidate.get("adherence")), _num(reference.get("adherence"))
    loss, ref_loss = _num(candidate.get("eval_loss")), _num(reference.get("eval_loss"))
    if adh is not None and adh < config.min_adherence:
        return False, f"adherence {adh:.2f} is below the floor {config.min_adherence:.2f}"
    probe_note = "; " + notes[0] if notes else ""
    if adh is not None and ref_adh is not None:
        delta = adh - ref_adh
        if delta >= config.adherence_margin - 1e-12:
            return True, f"adherence {adh:.2f} vs {reference_name} {ref_adh:.2f} (+{delta:.2f} >= {config.adherence_margin:.2f}){probe_note}"
        if abs(delta) > config.adherence_tolerance + 1e-12:
            verb = "fell" if delta < 0 else "rose too little"
            return False, (f"adherence {verb}: {adh:.2f} vs {reference_name} {ref_adh:.2f} ({delta:+.2f}; "
                           f"needs +{config.adherence_margin:.2f}, or equal adherence and lower loss)")
        basis = f"equal adherence {adh:.2f}, "
    else:
        basis = "no habit checker, "
    if loss is None or ref_loss is None:
        return False, f"{basis}and no held-out loss to compare with {reference_name}"
    drop = ref_loss - loss
    if drop >= config.loss_margin - 1e-12:
        return True, f"{basis}held-out loss {loss:.4f} vs {reference_name} {ref_loss:.4f} (-{drop:.4f} >= {config.loss_margin:.4f}){probe_note}"
    return False, (f"{basis}held-out loss {loss:.4f} vs {reference_name} {ref_loss:.4f} "
                   f"(drop {drop:+.4f} < {config.loss_margin:.4f})")


def check_drift(candidate: dict, config: GateConfig = GateConfig()) -> tuple[bool, str]:
    """The drift guard: ``candidate["drift"]`` lists the user's earlier eval sets, each with the candidate's and the
    reference's ``adherence`` / ``eval_loss`` on it. Returns ``(kept every habit?, reason)``."""
    entries = candidate.get("drift") or []
    kept = []
    for e in entries:
        name = e.get("eval_set") or e.get("eval_digest", "?")[:12]
        adh, ref_adh = _num(e.get("adherence")), _num(e.get("ref_adherence"))
        loss, ref_loss = _num(e.get("eval_loss")), _num(e.get("ref_eval_loss"))
        if adh is not None and ref_adh is not None:
            if ref_adh - adh > config.max_habit_drop + 1e-12:
                return False, (f"drift guard: lost the earlier habit {name!r}: adherence {adh:.2f} vs "
                               f"{e.get('reference', 'reference')} {ref_adh:.2f} (-{ref_adh - adh:.2f} > "
                               f"{config.max_habit_drop:.2f} allowed)")
            kept.append(f"{name} {adh:.2f}")
        elif loss is not None and ref_loss is not None:
            if loss - ref_loss > config.max_habit_loss_rise + 1e-12:
                return False, (f"drift guard: lost the earlier habit {name!r}: held-out loss {loss:.4f} vs "
                               f"{e.get('reference', 'reference')} {ref_loss:.4f} (+{loss - ref_loss:.4f} > "
                               f"{config.max_habit_loss_rise:.4f} allowed)")
            kept.append(f"{name} loss {loss:.3f}")
        else:
            return False, f"drift guard: earlier eval set {name!r} was not measured on both sides"
    return True, ("earlier habits kept (" + ", ".join(kept) + ")") if kept else "no earlier habits"


def _live(registry, ref: str):
    try:
        return registry.resolve(f"{ref}@{LIVE}")
    except NotFoundError:
        return None


def _record(registry, rev, decision: GateDecision, actor: str) -> GateDecision:
    """Move the alias that carries the decision's audit entry; merge the decision into metrics["gate"]."""
    if decision.promoted:
        entry = registry.set_alias(rev.ref, LIVE, rev.number, actor=actor, reason=decision.reason)
    else:
        current = registry.get_adapter(rev.ref).aliases.get(CANDIDATE)
        alias = CANDIDATE if current in (None, rev.number) else REFUSED
        entry = registry.set_alias(rev.ref, alias, rev.number, actor=actor, reason=decision.reason)
    decision = GateDecision(**{**decision.to_dict(), "audit_id": entry.id})
    registry.update_metrics(rev.address, {"gate": {
        "decision": "forced" if decision.forced else ("promoted" if decision.promoted else "refused"),
        "reason": decision.reason, "reference": decision.reference, "actor": actor,
        "adherence": decision.candidate.get("adherence"),
        "in_context_adherence": decision.candidate.get("in_context_adherence"),
        "at": datetime.now(UTC).isoformat(), "audit_id": entry.id,
    }})
    return decision


def gate(registry, address: str, *, config: GateConfig = GateConfig(), actor: str = DEFAULT_ACTOR,
         evaluate=None) -> GateDecision:
    """Decide whether revision ``address`` goes live, act on it, and audit it.

    The candidate must already carry metrics (``lorafleet eval``). It is compared with ``live`` on the same eval
    set: when live's stored metrics are for another eval set, ``evaluate(live_rev, eval_digest) -> metrics`` (if
    given) measures live on the candidate's set (not stored); without it the candidate is refused with the
    reason. With nothing live, the reference is the base (``base_adherence`` / ``base_eval_loss``).
    """
    rev = registry.resolve(address)
    cand = rev.provenance.metrics
    live = _live(registry, rev.ref)
    if live is not None and live.number == rev.number:
        return GateDecision(rev.address, True, f"{rev.address} is already live; nothing to do", "-", candidate=_pick(cand))
    if live is None:
        reference, ref_name = {"adherence": cand.get("base_adherence"), "eval_loss": cand.get("base_eval_loss")}, "base"
        ref_label = "base"
    else:
        ref_name = ref_label = f"live #{live.number}"
        reference = live.provenance.metrics
        if cand.get("eval_digest") and reference.get("eval_digest") != cand.get("eval_digest"):
            if evaluate is None:
                decision = GateDecision(rev.address, False, (
                    f"gate refused {rev.address}: {ref_name} has no metrics on the candidate's eval set "
                    f"{cand.get('eval_set')!r}; evaluate it there (`lorafleet eval {live.address} ...`)"),
                    ref_label, candidate=_pick(cand), reference_metrics=_pick(reference))
                return _record(registry, rev, decision, actor)
            reference = evaluate(live, cand["eval_digest"])
    ok, why = decide(cand, reference, config, reference_name=ref_name)
    if ok and cand.get("drift"):
        kept, drift_why = check_drift(cand, config)
        ok, why = (True, f"{why}; {drift_why}") if kept else (False, drift_why)
    reason = f"gate {'promoted' if ok else 'refused'} {rev.address}: {why}"
    decision = GateDecision(rev.address, ok, reason, ref_label, candidate=_pick(cand), reference_metrics=_pick(reference))
    return _record(registry, rev, decision, actor)


def promote(registry, address: str, *, force: bool = False, reason: str = "", config: GateConfig = GateConfig(),
            actor: str = DEFAULT_ACTOR, evaluate=None) -> GateDecision:
    """Run the gate on ``address``; with ``force`` skip it and move ``live`` there, audited as forced."""
    if not force:
        return gate(registry, address, config=config, actor=actor, evaluate=evaluate)
    rev = registry.resolve(address)
    why = f"forced promotion of {rev.address}: {reason.strip() or 'no reason given'} (gate bypassed)"
    decision = GateDecision(rev.address, True, why, "-", forced=True, candidate=_pick(rev.provenance.metrics))
    return _record(registry, rev, decision, actor)


def rollback(registry, ref: str, *, to: int | None = None, actor: str = DEFAULT_ACTOR, reason: str = ""):
    """Move ``live`` back (previous live, or revision ``to``): delegates to ``Registry.rollback``."""
    return registry.rollback(ref, to=to, actor=actor, reason=reason or "rollback")
