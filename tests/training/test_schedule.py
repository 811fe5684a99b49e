"""Update policies, planning (new examples, held-out, replay, window) and the scheduler's loop on the tiny base,
including the drift guard refusing a revision that learned a new preference but lost an earlier one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.continual.schedule import PolicyError, Scheduler, UpdatePolicy, due, is_heldout, plan_update
from lorafleet.registry import Provenance, Registry
from lorafleet.registry.memory import MemorySettings, MemoryStore
from lorafleet.training.worker import Worker

REF = "acme/alice/assistant"

POLICY_ERRORS = [
    ({"min_examples": 0}, "min_examples"),
    ({"every_hours": -1}, "every_hours"),
    ({"holdout": 0.9}, "holdout"),
    ({"method": "rlhf"}, "method"),
    ({"replay": float("nan")}, "replay"),
    ({"steps": True}, "steps"),
    ({"colour": "blue"}, "unknown update policy field"),
    ({"eval_persona": "nobody-here"}, "not a usable persona"),
    ({"gate": {"max_habit_drop": 2}}, "gate overrides"),
    ({"gate": {"nonsense": 1}}, "gate overrides"),
]


@pytest.mark.parametrize(("data", "match"), POLICY_ERRORS)
def test_policy_errors_name_the_field(data, match):
    with pytest.raises(PolicyError, match=match):
        UpdatePolicy.from_dict(data)


def test_policy_round_trip_and_probe_off():
    p = UpdatePolicy.from_dict({"min_examples": 4, "eval_persona": "ahab", "probe": False})
    assert UpdatePolicy.from_dict(p.to_dict()) == p
    assert p.persona().name == "ahab" and not p.gate_config().require_probe


def test_due():
    now = datetime(2026, 11, 29, 12, tzinfo=UTC)
    s = MemorySettings(REF, last_run_at=now - timedelta(hours=3))
    assert due(s, UpdatePolicy(min_examples=4), 4, now)
    assert due(s, UpdatePolicy(min_examples=4), 3, now) is None
    assert "h since" in due(s, UpdatePolicy(min_examples=4, every_hours=2), 1, now)
    assert due(s, UpdatePolicy(min_examples=4, every_hours=4), 1, now) is None
    assert due(s, UpdatePolicy(min_examples=4, every_hours=2), 0, now) is None


@pytest.fixture
def env(tmp_path, tiny_base):
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}", str(tmp_path / "blobs"))
    adapter = LoraAdapter.create(tiny_base, LoraSpec(rank=4, alpha=8, target_modules="all"), seed=0)
    reg.create_adapter(REF)
    reg.commit(REF, to_bytes(adapter), Provenance(base_fingerprint=tiny_base.fingerprint, method="init"),
               aliases=("live",))
    store = MemoryStore(reg)
    yield reg, store
    reg.close()


def _teach(store: MemoryStore, answer: str, n: int, start: int) -> None:
    """``n`` captured conversations, each rewritten by the user into ``answer``."""
    for i in range(start, start + n):
        rid = f"r{i}"
        store.record(REF, rid, prompt=[{"role": "user", "content": f"question {i}?"}], response="meh", revision=1)
        store.add_feedback(rid, rewrite=answer)


def test_plan_holds_out_replays_and_names_the_window(env):
    _, store = env
    store.configure(REF, capture=True, enabled=True)
    policy = UpdatePolicy(min_examples=4, holdout=0.25, replay=0.5, seed=3)
    _teach(store, "style one", 8, 0)
    store.record(REF, "pair-a", prompt=[{"role": "user", "content": "q"}], response="A", revision=1)
    store.record(REF, "pair-b", prompt=[{"role": "user", "content": "q"}], response="B", revision=1)
    store.add_feedback("pair-a", other_id="pair-b", preferred="other")  # id 9: a DPO pair, trained as SFT on B
    plan = plan_update(store, store.settings(REF), policy)
    assert plan.method == "sft" and plan.replay == []  # nothing older yet
    assert plan.window["feedback_ids"] == [1, 9] and plan.window["heldout_examples"] == 2  # ids 4 and 8
    assert len(plan.train) == 7 and {"role": "assistant", "content": "B"} in plan.train[-1]["messages"]
    store.update_schedule_state(REF, watermark=9)
    _teach(store, "style two", 4, 100)  # ids 10..13; 12 is held out
    plan = plan_update(store, store.settings(REF), policy)
    assert plan.window["feedback_ids"] == [10, 13] and len(plan.train) == 3
    assert len(plan.replay) == 2 and all(r in [*_older(store)] for r in plan.replay)  # ceil(0.5 * 3), older only
    assert not any(is_heldout(i, policy) for i in (1, 2, 3, 5, 6, 7, 9))
    assert plan_update(store, store.settings(REF), UpdatePolicy(method="dpo")) is None  # no new pair


def _older(store):
    return [e["record"] for e in store.examples(REF, upto=9) if e["id"] % 4 and e["method"] == "sft"] + [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "B"}]}]


POLICY = {"min_examples": 8, "steps": 12, "lr": 0.02, "rank": 4, "batch_size": 4, "max_new_tokens": 4,
          "holdout": 0.25, "probe": False}


def test_cycles_and_the_drift_guard(env, tiny_base):
    """Cycle 1 learns style X (promoted). Cycle 2 teaches style Y hard, without replay: it learns Y but loses X,
    and the drift guard refuses it with the lost habit in the reason (audit log); with replay it is judged again."""
    reg, store = env
    store.configure(REF, capture=True, enabled=True, policy=POLICY)
    scheduler = Scheduler(reg, tiny_base, memory=store)
    _teach(store, "Ahoy matey, the sea is calm today and the answer is near.", 8, 0)
    Worker(reg, tiny_base, hooks=[scheduler.tick]).run(until_idle=True)
    first = store.settings(REF).last_result
    assert first["state"] == "promoted", first
    live2 = reg.resolve(REF)
    assert live2.number == 2 and live2.provenance.metrics["drift"] == []  # nothing earlier than the first window

    store.configure(REF, policy={**POLICY, "replay": 0.0, "steps": 40, "lr": 0.05})
    _teach(store, "zq zq zq zq zq zq zq zq zq zq zq zq zq zq zq zq zq zq", 8, 100)
    Worker(reg, tiny_base, hooks=[scheduler.tick]).run(until_idle=True)
    second = store.settings(REF).last_result
    cand = reg.resolve(second["revision"])
    drift = cand.provenance.metrics["drift"]
    assert len(drift) == 1 and drift[0]["eval_set"].startswith("feedback:acme/alice/assistant:")
    assert drift[0]["eval_loss"] - drift[0]["ref_eval_loss"] > 0.1  # it forgot style X
    assert cand.provenance.metrics["eval_loss"] < cand.provenance.metrics["reference"]["eval_loss"]  # learned Y
    assert second["state"] == "refused" and "drift guard: lost the earlier habit" in second["reason"]
    assert reg.resolve(REF).number == 2  # live stayed
    assert "drift guard" in reg.audit(REF, 1)[0].reason
    assert cand.provenance.hyperparams["window"]["replay_examples"] == 0
    assert store.settings(REF).watermark == second["window"]["feedback_ids"][1]


def test_the_in_context_policy_in_the_loop(env, tiny_base):
    """With a persona the loop measures the in-context baseline (the persona's description + the user's own
    feedback in the prompt) and reports it; ``require_in_context_margin`` makes the gate enforce it."""
    reg, store = env

    def prompt_wins(base, prompts, adapters, max_new_tokens):  # the profile in the prompt signs off; weights do not
        return ["Fine. — Ahab" if p[0]["role"] == "system" else "Fine." for p in prompts]

    policy = {**POLICY, "eval_persona": "ahab", "max_new_tokens": 2, "gate": {"require_in_context_margin": 0.05}}
    store.configure(REF, capture=True, enabled=True, policy=policy)
    scheduler = Scheduler(reg, tiny_base, memory=store, backend=prompt_wins)
    _teach(store, "Fine, thank you. — Ahab", 8, 0)
    Worker(reg, tiny_base, hooks=[scheduler.tick]).run(until_idle=True)
    result = store.settings(REF).last_result
    cand = reg.resolve(result["revision"]).provenance.metrics
    assert cand["baselines"]["rows"]["in_context"]["adherence"] == 1.0 and cand["adherence"] == 0.0
    assert result["state"] == "refused" and "below the in-context baseline 1.00" in result["reason"], result
    assert "below the in-context baseline" in reg.audit(REF, 1)[0].reason
