"""The gate's rule (table-driven) and its decisions against a real registry: promote, refuse (reason in the
audit log), force (audited), rollback."""

from __future__ import annotations

import pytest

from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.gate import GateConfig, check_drift, decide, gate, promote, rollback
from lorafleet.registry import Provenance

REF = "acme/alice/assistant"
FP = "f" * 64
PROBE_OK = {"probe_ppl_ratio": 1.02, "probe_retention": 1.0}


def _m(adherence, loss, digest="d1", **extra):
    return {"eval_set": "persona:x", "eval_digest": digest, "adherence": adherence, "eval_loss": loss, **PROBE_OK,
            "base_adherence": 0.0, "base_eval_loss": 3.0, **extra}


# (candidate, reference, expected promote, reason fragment)
RULES = [
    (_m(0.50, 2.0), {"adherence": 0.40, "eval_loss": 1.0}, True, "+0.10 >= 0.05"),
    (_m(0.45, 2.0), {"adherence": 0.40, "eval_loss": 1.0}, True, "+0.05 >= 0.05"),
    (_m(0.42, 1.0), {"adherence": 0.40, "eval_loss": 2.0}, False, "adherence rose too little"),
    (_m(0.30, 0.1), {"adherence": 0.40, "eval_loss": 2.0}, False, "adherence fell"),
    (_m(0.40, 1.50), {"adherence": 0.40, "eval_loss": 1.60}, True, "equal adherence 0.40, held-out loss"),
    (_m(0.40, 1.59), {"adherence": 0.40, "eval_loss": 1.60}, False, "drop +0.0100 < 0.0200"),
    (_m(None, 1.50), {"adherence": None, "eval_loss": 1.60}, True, "no habit checker"),
    (_m(None, 1.70), {"adherence": None, "eval_loss": 1.60}, False, "no habit checker"),
    (_m(0.9, 1.0, probe_ppl_ratio=1.7), {"adherence": 0.0, "eval_loss": 3.0}, False, "perplexity x1.700 > x1.500"),
    (_m(0.9, 1.0, probe_retention=0.5), {"adherence": 0.0, "eval_loss": 3.0}, False, "kept 50%"),
    (_m(0.9, 1.0, probe_retention=None), {"adherence": 0.0, "eval_loss": 3.0}, False, "probe missing"),
    ({"adherence": 0.9}, {"adherence": 0.0, "eval_loss": 3.0}, False, "not evaluated"),
]


@pytest.mark.parametrize(("cand", "ref", "expected", "fragment"), RULES)
def test_rule(cand, ref, expected, fragment):
    ok, reason = decide(cand, ref, GateConfig())
    assert ok is expected
    assert fragment in reason


def test_rule_is_configurable():
    cand, ref = _m(0.42, 1.0), {"adherence": 0.40, "eval_loss": 2.0}
    assert decide(cand, ref, GateConfig(adherence_margin=0.02))[0]
    assert decide(_m(0.41, 1.0), ref, GateConfig(adherence_margin=0.05, adherence_tolerance=0.02))[0]  # ~equal, loss down
    assert not decide(_m(0.9, 1.0), {"adherence": 0.0, "eval_loss": 3.0}, GateConfig(min_adherence=0.95))[0]
    no_probe = {k: v for k, v in _m(0.9, 1.0).items() if not k.startswith("probe")}
    assert decide(no_probe, {"adherence": 0.0, "eval_loss": 3.0}, GateConfig(require_probe=False))[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"adherence_margin": 2.0}, "adherence_margin=2.0 is out of range"),
        ({"loss_margin": -1.0}, "loss_margin"),
        ({"max_ppl_ratio": 0.5}, "max_ppl_ratio"),
        ({"min_probe_retention": float("nan")}, "min_probe_retention"),
        ({"adherence_margin": 0.05, "adherence_tolerance": 0.05}, "adherence_tolerance must be smaller"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(EvaluationError, match=match):
        GateConfig(**kwargs)


def _commit(registry, metrics: dict | None, tag: bytes) -> str:
    """Commit a small canonical adapter blob standing for ``tag`` (the gate reads only metrics)."""
    import torch

    from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes

    a = torch.tensor([list(tag)], dtype=torch.float32)
    blob = to_bytes(LoraAdapter(LoraSpec(rank=1, target_modules="q_proj"),
                                {"model.layers.0.self_attn.q_proj": (a, torch.zeros(1, 1))}))
    rev = registry.commit(REF, blob, Provenance(base_fingerprint=FP, metrics=metrics or {}), creator="test")
    return rev.address


def _live(registry):
    return registry.get_adapter(REF).aliases.get("live")


def test_first_revision_promoted_over_the_base(registry):
    a1 = _commit(registry, _m(0.9, 1.0), b"one")
    d = gate(registry, a1)
    assert d.promoted and d.reference == "base" and _live(registry) == 1
    entry = registry.audit(REF)[0]
    assert entry.alias == "live" and entry.to_number == 1 and entry.reason.startswith("gate promoted")
    assert entry.id == d.audit_id and entry.actor == "gate"
    assert registry.resolve(a1).provenance.metrics["gate"]["decision"] == "promoted"


def test_first_revision_that_does_not_beat_the_base_stays_candidate(registry):
    a1 = _commit(registry, _m(0.0, 3.5), b"one")
    d = gate(registry, a1)
    assert not d.promoted and _live(registry) is None
    entry = registry.audit(REF)[0]
    assert entry.alias == "candidate" and entry.from_number == entry.to_number == 1
    assert entry.reason.startswith("gate refused") and "base" in entry.reason


def test_promote_then_refuse_then_force_then_rollback(registry):
    a1 = _commit(registry, _m(0.6, 1.0), b"one")
    assert gate(registry, a1).promoted
    a2 = _commit(registry, _m(0.5, 0.5), b"two")  # lower adherence: refused though its loss is lower
    d2 = gate(registry, a2)
    assert not d2.promoted and d2.reference == "live #1" and "adherence fell" in d2.reason
    assert _live(registry) == 1 and registry.get_adapter(REF).aliases["candidate"] == 2
    refusal = registry.audit(REF)[0]
    assert refusal.reason == d2.reason and refusal.alias == "candidate"
    assert registry.resolve(a2).provenance.metrics["gate"]["decision"] == "refused"

    forced = promote(registry, a2, force=True, reason="customer asked", actor="ops:bob")
    assert forced.promoted and forced.forced and _live(registry) == 2
    entry = registry.audit(REF)[0]
    assert entry.actor == "ops:bob" and entry.reason.startswith("forced promotion") and "customer asked" in entry.reason
    assert registry.resolve(a2).provenance.metrics["gate"]["decision"] == "forced"

    back = rollback(registry, REF, reason="bad outputs")
    assert back.action == "rollback" and back.to_number == 1 and _live(registry) == 1
    assert registry.audit(REF)[0].reason == "bad outputs"


def test_better_candidate_replaces_live(registry):
    gate(registry, _commit(registry, _m(0.5, 1.0), b"one"))
    d = gate(registry, _commit(registry, _m(0.5, 0.9), b"two"))
    assert d.promoted and "equal adherence" in d.reason and _live(registry) == 2


def test_already_live_is_a_no_op(registry):
    a1 = _commit(registry, _m(0.9, 1.0), b"one")
    gate(registry, a1)
    n = len(registry.audit(REF))
    d = gate(registry, a1)
    assert d.promoted and "already live" in d.reason and len(registry.audit(REF)) == n


def test_live_measured_on_another_eval_set(registry):
    gate(registry, _commit(registry, _m(0.5, 1.0, digest="d1"), b"one"))
    a2 = _commit(registry, _m(0.9, 1.0, digest="d2"), b"two")
    d = gate(registry, a2)
    assert not d.promoted and "no metrics on the candidate's eval set" in d.reason and _live(registry) == 1
    seen = []
    d = gate(registry, a2, evaluate=lambda live, digest: seen.append((live.number, digest)) or {"adherence": 0.2,
                                                                                               "eval_loss": 1.0})
    assert d.promoted and seen == [(1, "d2")] and _live(registry) == 2


def test_refusing_an_older_revision_leaves_candidate_on_the_newer_one(registry):
    a1 = _commit(registry, _m(0.0, 9.0), b"one")
    _commit(registry, None, b"two")
    d = gate(registry, a1)
    assert not d.promoted
    aliases = registry.get_adapter(REF).aliases
    assert aliases["candidate"] == 2 and aliases["refused"] == 1
    assert registry.audit(REF)[0].alias == "refused"


def test_unevaluated_revision_is_refused(registry):
    d = gate(registry, _commit(registry, None, b"one"))
    assert not d.promoted and "not evaluated" in d.reason and _live(registry) is None


# --------------------------------------------------------------------------- the drift guard (earlier habits)

def _drift(adh, ref_adh, loss=None, ref_loss=None, name="persona:ahab"):
    return {"eval_set": name, "eval_digest": "e" * 64, "adherence": adh, "ref_adherence": ref_adh,
            "eval_loss": loss, "ref_eval_loss": ref_loss, "reference": "live #1"}


# (drift entries, expected kept, reason fragment)
DRIFT = [
    ([], True, "no earlier habits"),
    ([_drift(0.90, 0.95)], True, "earlier habits kept (persona:ahab 0.90)"),
    ([_drift(0.85, 0.95)], True, "kept"),  # exactly the allowed 0.10
    ([_drift(0.50, 0.95)], False, "lost the earlier habit 'persona:ahab': adherence 0.50 vs live #1 0.95"),
    ([_drift(0.9, 0.9), _drift(0.1, 0.8, name="persona:greta")], False, "'persona:greta'"),
    ([_drift(None, None, 1.05, 1.0, name="feedback:x")], True, "feedback:x loss 1.050"),
    ([_drift(None, None, 1.5, 1.0, name="feedback:x")], False, "held-out loss 1.5000 vs live #1 1.0000"),
    ([_drift(None, None, None, 1.0)], False, "not measured on both sides"),
]


@pytest.mark.parametrize(("entries", "kept", "fragment"), DRIFT)
def test_drift_rule(entries, kept, fragment):
    ok, reason = check_drift({"drift": entries})
    assert ok is kept and fragment in reason


def test_drift_guard_refuses_a_revision_that_loses_an_earlier_habit(registry):
    a1 = _commit(registry, _m(0.0, 2.0), b"one")
    promote(registry, a1, force=True, reason="setup")
    # better on the new habit (adherence 0.0 -> 0.9), but the earlier habit fell from 0.95 to 0.40
    a2 = _commit(registry, _m(0.9, 1.0, drift=[_drift(0.40, 0.95)]), b"two")
    d = gate(registry, a2, evaluate=lambda live, digest: {"adherence": 0.0, "eval_loss": 2.0})
    assert not d.promoted and _live(registry) == 1
    assert "drift guard: lost the earlier habit 'persona:ahab'" in registry.audit(REF)[0].reason
    # the same revision keeping the old habit passes, and says so
    a3 = _commit(registry, _m(0.9, 1.0, drift=[_drift(0.95, 0.95)]), b"three")
    d = gate(registry, a3, evaluate=lambda live, digest: {"adherence": 0.0, "eval_loss": 2.0})
    assert d.promoted and "earlier habits kept" in d.reason
    # a looser guard is configurable
    assert check_drift({"drift": [_drift(0.40, 0.95)]}, GateConfig(max_habit_drop=0.6))[0]


# -- the in-context policy: the candidate against the base with the user in the prompt

def _with_ic(adherence, in_context, loss=1.0):
    return _m(adherence, loss, baselines={"k": 4, "rows": {"in_context": {"adherence": in_context}}})


def test_in_context_baseline_is_reported_not_enforced_by_default(registry):
    a1 = _commit(registry, _with_ic(0.50, 0.90), b"one")  # beats the base, loses to the prompt
    d = gate(registry, a1)
    assert d.promoted and _live(registry) == 1
    entry = registry.audit(REF)[0]
    assert "in-context baseline adherence 0.90 vs 0.50 (reported, not enforced)" in entry.reason
    assert d.candidate["in_context_adherence"] == 0.90
    recorded = registry.resolve(a1).provenance.metrics["gate"]
    assert recorded["adherence"] == 0.50 and recorded["in_context_adherence"] == 0.90


def test_in_context_margin_enforced_refuses_with_the_reason(registry):
    config = GateConfig(require_in_context_margin=0.05)
    a1 = _commit(registry, _with_ic(0.50, 0.90), b"one")
    d = gate(registry, a1, config=config)
    assert not d.promoted and _live(registry) is None
    entry = registry.audit(REF)[0]
    assert entry.alias == "candidate" and entry.reason.startswith("gate refused")
    assert "adherence 0.50 is below the in-context baseline 0.90 by 0.40 > margin 0.05" in entry.reason
    a2 = _commit(registry, _with_ic(0.86, 0.90), b"two")  # within the margin: the usual rule decides
    d2 = gate(registry, a2, config=config)
    assert d2.promoted and "within margin 0.05" in d2.reason and _live(registry) == 2


@pytest.mark.parametrize(("cand", "fragment"), [
    (_m(0.9, 1.0), "in-context baseline was not measured"),
    (_m(None, 1.0, baselines={"rows": {"in_context": {"adherence": None}}}), "no habit checker"),
])
def test_in_context_margin_needs_the_numbers(cand, fragment):
    ok, reason = decide(cand, {"adherence": 0.0, "eval_loss": 3.0}, GateConfig(require_in_context_margin=0.05))
    assert not ok and fragment in reason


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.1"])
def test_in_context_margin_is_validated(bad):
    with pytest.raises(EvaluationError, match="require_in_context_margin"):
        GateConfig(require_in_context_margin=bad)
