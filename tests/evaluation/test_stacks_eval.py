"""A stacked member is evaluated on top of its parents; after a parent moves, the stack report re-evaluates the
members and flags those below the gate, without moving any alias."""

from __future__ import annotations

import pytest
import torch

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.adapters.stack import AdapterStack
from lorafleet.evaluation.gate import GateConfig
from lorafleet.evaluation.metrics import EvalSet, evaluate_revision
from lorafleet.evaluation.personas import Persona
from lorafleet.evaluation.stacks import FLAGGED, NO_LIVE, OK, UNCHANGED, judge, stack_report
from lorafleet.registry import Provenance

SMALL = Persona("small", "signoff", {"text": "— Ahab"}, seed=0, n_train=4, n_eval=3)
PROBE_OK = {"probe_ppl_ratio": 1.0, "probe_retention": 1.0}

JUDGE = [
    ({"adherence": 1.0}, {"adherence": 0.96, **PROBE_OK}, False, "1.00 -> 0.96"),
    ({"adherence": 1.0}, {"adherence": 0.5, **PROBE_OK}, True, "adherence fell 1.00 -> 0.50"),
    ({"adherence": 0.5}, {"adherence": 0.9, "probe_ppl_ratio": 1.9, "probe_retention": 1.0}, True, "x1.900"),
    ({"adherence": 0.5}, {"adherence": 0.9, "probe_ppl_ratio": 1.0, "probe_retention": 0.5}, True, "kept 50%"),
    ({"eval_loss": 1.0}, {"adherence": None, "eval_loss": 1.5, **PROBE_OK}, True, "loss rose"),
    ({"eval_loss": 1.0}, {"adherence": None, "eval_loss": 1.01, **PROBE_OK}, False, "1.0000 -> 1.0100"),
    ({}, {"adherence": 0.2, **PROBE_OK}, False, "no earlier adherence"),
]


@pytest.mark.parametrize(("before", "after", "flag", "fragment"), JUDGE)
def test_judge(before, after, flag, fragment):
    got, why = judge(before, after, GateConfig())
    assert got == flag and fragment in why, why


def _adapter(base, seed):
    return LoraAdapter.create(base, LoraSpec(rank=2, alpha=4, target_modules="attention"), seed=seed, init="random")


def _commit_live(reg, base, ref, adapter):
    rev = reg.commit(ref, to_bytes(adapter), Provenance(base_fingerprint=base.fingerprint))
    reg.set_alias(ref, "live", rev.number)
    return rev


def test_member_evaluated_on_its_stack_then_flagged_when_the_org_moves(registry, tiny_base):
    org1, org2, alice = _adapter(tiny_base, 1), _adapter(tiny_base, 2), _adapter(tiny_base, 3)
    registry.create_adapter("acme/_org/support")
    org1_rev = _commit_live(registry, tiny_base, "acme/_org/support", org1)
    registry.create_adapter("acme/alice/assistant", parent="acme/_org/support")
    registry.create_adapter("acme/bob/assistant", parent="acme/_org/support")  # nothing live: reported as such
    alice_rev = _commit_live(registry, tiny_base, "acme/alice/assistant", alice)
    es = EvalSet.from_persona(SMALL)
    gold = {str(p): r["messages"][-1]["content"] for p, r in zip(es.prompts, es.records, strict=True)}
    name = next(iter(org1.weights))
    seen = []

    def backend(base, prompts, adapters, max_new_tokens):
        """The habit holds only on top of org #1 (a stand-in for a parent move that breaks the member)."""
        out = []
        for p, a in zip(prompts, adapters, strict=True):
            seen.append(type(a).__name__)
            on_org1 = isinstance(a, AdapterStack) and torch.equal(a.levels[0].weights[name][0], org1.weights[name][0])
            out.append(gold.get(p[-1]["content"], "Paris. — Ahab") if on_org1 else "no")
        return out

    info, m = evaluate_revision(registry, alice_rev.address, tiny_base, es, max_new_tokens=4, backend=backend)
    assert m["adherence"] == 1.0 and "AdapterStack" in seen
    assert [lvl["digest"] for lvl in m["stack"]] == [org1_rev.digest, alice_rev.digest]

    # nothing moved yet: alice is unchanged (not even re-evaluated)
    checks = {c.ref: c for c in stack_report(registry, tiny_base, "acme/_org/support", backend=backend)}
    assert checks["acme/alice/assistant"].status == UNCHANGED and checks["acme/bob/assistant"].status == NO_LIVE

    org2_rev = _commit_live(registry, tiny_base, "acme/_org/support", org2)
    audit_before = registry.audit("acme/alice/assistant")
    checks = {c.ref: c for c in stack_report(registry, tiny_base, "acme/_org/support", backend=backend)}
    alice_check = checks["acme/alice/assistant"]
    assert alice_check.status == FLAGGED and "adherence fell 1.00 -> 0.00" in alice_check.reason
    assert [p["digest"] for p in alice_check.parents_before] == [org1_rev.digest]
    assert [p["digest"] for p in alice_check.parents_now] == [org2_rev.digest]
    # a report only: alice stays live at #1, no audit entry, her gate metrics untouched; the check is recorded
    assert registry.resolve("acme/alice/assistant").number == alice_rev.number
    assert registry.audit("acme/alice/assistant") == audit_before
    stored = registry.resolve(alice_rev.address).provenance.metrics
    assert stored["adherence"] == 1.0 and stored["stack_check"]["status"] == FLAGGED

    # rolled back to org #1: alice passes again (re-evaluated with --all semantics)
    registry.rollback("acme/_org/support")
    checks = {c.ref: c for c in stack_report(registry, tiny_base, "acme/_org/support", everyone=True, backend=backend)}
    assert checks["acme/alice/assistant"].status == OK
