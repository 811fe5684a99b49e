"""Stacks in the registry: parent links (validated, audited), resolving every level's own alias, members."""

from __future__ import annotations

import pytest
from registry_helpers import blob

from lorafleet.registry import NotFoundError, Provenance
from lorafleet.registry.errors import BaseMismatchError, InvalidArgumentError
from lorafleet.registry.stacks import StackError

FP = "fp-test"


def _commit(reg, ref: str, payload: bytes, live: bool = True):
    rev = reg.commit(ref, blob(payload), Provenance(base_fingerprint=FP))
    if live:
        reg.set_alias(ref, "live", rev.number)
    return rev


@pytest.fixture
def stacked(registry):
    reg = registry  # SQLite and PostgreSQL
    reg.create_adapter("acme/_org/support")
    reg.create_adapter("acme/team/triage", parent="acme/_org/support")
    reg.create_adapter("acme/alice/assistant", parent="acme/team/triage")
    reg.create_adapter("acme/bob/assistant", parent="acme/_org/support")
    return reg


def test_resolve_stack_root_first_each_level_on_its_own_live(stacked):
    reg = stacked
    org1 = _commit(reg, "acme/_org/support", b"org-1")
    team = _commit(reg, "acme/team/triage", b"team-1")
    alice = _commit(reg, "acme/alice/assistant", b"alice-1")
    revs = reg.resolve_stack("acme/alice/assistant")
    assert [r.address for r in revs] == [org1.address, team.address, alice.address]
    assert reg.get_adapter("acme/alice/assistant").parent == "acme/team/triage"
    assert reg.get_adapter("acme/alice/assistant").to_dict()["parent"] == "acme/team/triage"

    # Promoting the org adapter moves every member at once; the member's own address still decides its level.
    org2 = _commit(reg, "acme/_org/support", b"org-2")
    assert reg.resolve_stack("acme/alice/assistant")[0].digest == org2.digest
    alice2 = _commit(reg, "acme/alice/assistant", b"alice-2", live=False)
    assert [r.address for r in reg.resolve_stack(f"acme/alice/assistant#{alice2.number}")] == [
        org2.address, team.address, alice2.address]
    # An adapter without parent resolves to itself alone.
    assert [r.address for r in reg.resolve_stack("acme/_org/support")] == [org2.address]


def test_a_parent_without_live_revision_names_the_level(stacked):
    _commit(stacked, "acme/bob/assistant", b"bob-1")
    with pytest.raises(NotFoundError, match=r"stacked on 'acme/_org/support'.*no live revision"):
        stacked.resolve_stack("acme/bob/assistant")


def test_load_stack_refuses_a_level_for_another_base(stacked):
    reg = stacked
    rev = reg.commit("acme/_org/support", blob(b"org-x"), Provenance(base_fingerprint="other-base"))
    reg.set_alias("acme/_org/support", "live", rev.number)
    _commit(reg, "acme/bob/assistant", b"bob-1")
    with pytest.raises(BaseMismatchError, match="acme/_org/support#1"):
        reg.load_stack("acme/bob/assistant", base_fingerprint=FP)


ERROR_CASES = [
    ("acme/carol/a", "other/_org/support", StackError, "belongs to tenant 'other'"),
    ("acme/carol/a", "acme/_org/nothing", NotFoundError, "does not exist; create it first"),
    ("acme/carol/a", "acme/alice/assistant", StackError, "stack too deep"),
    ("acme/carol/a", "not a ref", StackError, "invalid parent"),
]


@pytest.mark.parametrize(("ref", "parent", "error", "match"), ERROR_CASES)
def test_bad_parent_is_refused_and_nothing_is_created(stacked, ref, parent, error, match):
    stacked.create_adapter("other/_org/support")
    with pytest.raises(error, match=match):
        stacked.create_adapter(ref, parent=parent)
    with pytest.raises(NotFoundError):
        stacked.get_adapter(ref)


def test_set_parent_refuses_cycles_self_and_depth_and_is_audited(stacked):
    reg = stacked
    with pytest.raises(StackError, match="cycle"):
        reg.set_parent("acme/_org/support", "acme/alice/assistant")
    with pytest.raises(StackError, match="its own parent"):
        reg.set_parent("acme/_org/support", "acme/_org/support")
    reg.create_adapter("acme/_org/top")
    with pytest.raises(StackError, match="already has 2 level"):  # support has team + alice below it
        reg.set_parent("acme/_org/support", "acme/_org/top")
    assert reg.get_adapter("acme/_org/support").parent is None  # nothing changed

    entry = reg.set_parent("acme/bob/assistant", "acme/team/triage", actor="ops", reason="bob joined triage")
    assert entry.action == "parent.set" and "acme/_org/support -> acme/team/triage" in entry.reason
    assert reg.get_adapter("acme/bob/assistant").parent == "acme/team/triage"
    assert reg.audit("acme/bob/assistant")[0].id == entry.id
    reg.set_parent("acme/bob/assistant", None)
    assert reg.get_adapter("acme/bob/assistant").parent is None


def test_members_children_then_grandchildren(stacked):
    assert [a.ref for a in stacked.stack_members("acme/_org/support")] == [
        "acme/bob/assistant", "acme/team/triage", "acme/alice/assistant"]
    assert [a.ref for a in stacked.stack_members("acme/alice/assistant")] == []


def test_exist_ok_with_another_parent_is_an_error(stacked):
    stacked.create_adapter("acme/bob/assistant", parent="acme/_org/support", exist_ok=True)
    with pytest.raises(Exception, match="already exists with parent"):
        stacked.create_adapter("acme/bob/assistant", parent="acme/team/triage", exist_ok=True)


def test_stack_error_is_an_invalid_argument():
    assert issubclass(StackError, InvalidArgumentError)
