"""Stacks in serving: rows with different stacks (organisation + person, team levels, single adapters, the base)
in one batch equal each row alone with its stack merged into the base; shared levels are resident once, with a
reference per row; a stack takes all its slots or none; a level that fails to load fails only its rows."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from lorafleet.adapters import LoraHost
from lorafleet.adapters.stack import AdapterStack, route_rows
from lorafleet.serving.engine import SamplingParams
from lorafleet.serving.sources import DictBlobs


def _step_until(engine, cond, timeout: float = 60.0) -> None:
    """Drive the engine (loads finish on worker threads) until ``cond()`` holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "engine did not reach the expected state"
        if not engine.step():
            time.sleep(0.002)


def _merged(plain, stack: AdapterStack | None):
    """A copy of the plain base with ``stack``'s summed delta added into its weights (the reference)."""
    model = copy.deepcopy(plain)
    if stack is not None:
        with torch.no_grad():
            for name in stack.modules():
                model.get_submodule(name).weight += stack.delta_weight(name)
    return model.eval()


@pytest.fixture(scope="module")
def levels(make_adapter):
    """org (rank 4, all), team (rank 2, attention), alice (rank 8, mlp), bob (rank 2, all)."""
    return {"org": make_adapter(4, "all", 31), "team": make_adapter(2, "attention", 32),
            "alice": make_adapter(8, "mlp", 33), "bob": make_adapter(2, "all", 34)}


def _choices(levels):
    org, team, alice, bob = (levels[k] for k in ("org", "team", "alice", "bob"))
    return [AdapterStack((org, team, alice)), AdapterStack((org, bob)), None, AdapterStack((org,)), bob,
            AdapterStack((org, alice)), AdapterStack((org, team, alice))]


def test_mixed_batch_of_stacks_equals_each_row_merged_into_the_base(sharp, levels):
    base, plain = sharp
    rows = _choices(levels)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 250, (len(rows), 11), generator=g)  # (B, T)
    table, slots = route_rows(rows)
    host = LoraHost.attach(base.model)
    with torch.no_grad(), host.route(table, slots):
        mixed = base.model(input_ids=ids).logits  # (B, T, V)
    assert torch.tensor(slots).shape == (len(rows), 3)
    for b, item in enumerate(rows):
        stack = item if isinstance(item, AdapterStack) or item is None else AdapterStack((item,))
        with torch.no_grad():
            alone = _merged(plain, stack)(input_ids=ids[b : b + 1]).logits[0]
        assert torch.allclose(mixed[b], alone, atol=1e-5, rtol=0), f"row {b}: {(mixed[b] - alone).abs().max()}"
    # the levels matter: a row's personal level changes its logits
    with torch.no_grad():
        org_only = _merged(plain, AdapterStack((levels["org"],)))(input_ids=ids[1:2]).logits[0]
    assert (mixed[1] - org_only).abs().max() > 1e-2


def _merged_generate(base, plain, prompt: list[int], stack: AdapterStack | None, max_new: int) -> list[int]:
    model = _merged(plain, stack)
    ids = torch.tensor([prompt])
    config = copy.deepcopy(plain.generation_config)
    config.eos_token_id, config.pad_token_id = [10**6], base.tokenizer.pad_token_id
    config.max_new_tokens, config.do_sample = max_new, False
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, ids.shape[1]:].tolist()


def test_engine_mixed_stacks_equal_merged_reference_and_name_every_level(sharp, levels, make_engine):
    base, plain = sharp
    blobs = DictBlobs()
    digest = {id(a): blobs.put(a) for a in levels.values()}
    rows = _choices(levels)
    as_request = [None if r is None else tuple(digest[id(a)] for a in r.levels) if isinstance(r, AdapterStack)
                  else digest[id(r)] for r in rows]
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 250, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 20, (len(rows),), generator=g)]
    engine = make_engine(blobs, max_batch=4, max_active=4, max_cached=5, max_prefill_tokens=48)
    results = engine.generate(prompts, as_request, SamplingParams(max_tokens=10, ignore_eos=True))
    for b, (res, item) in enumerate(zip(results, rows, strict=True)):
        assert res.ok, res.error
        stack = item if isinstance(item, AdapterStack) or item is None else AdapterStack((item,))
        assert res.token_ids == _merged_generate(base, plain, prompts[b], stack, 10), f"row {b}"
        want = () if as_request[b] is None else (as_request[b],) if isinstance(as_request[b], str) else as_request[b]
        assert res.stack == want and res.adapter == (want[-1] if want else None)
    snap = engine.residency_snapshot()
    assert len(snap["ram"]) == 4  # org, team, alice, bob: each resident once, however many rows used it
    assert all(e["refs"] == 0 and e["active"] == 0 for e in snap["ram"])


def test_shared_level_is_one_entry_with_a_reference_per_row(levels, make_engine):
    blobs = DictBlobs()
    org, team, alice, bob = (blobs.put(levels[k]) for k in ("org", "team", "alice", "bob"))
    engine = make_engine(blobs, max_batch=8, max_active=4, max_cached=4, join_batch=1)
    stacks = [(org, alice), (org, bob), (org, team, alice), (org,)]
    handles = [engine.submit([5, 6, 7, 8], s, SamplingParams(max_tokens=150, ignore_eos=True)) for s in stacks]
    _step_until(engine, lambda: len(engine._rows) == len(stacks))
    snap = engine.residency_snapshot()
    by_digest = {e["digest"]: e for e in snap["ram"]}
    assert by_digest[org]["refs"] == 4 and by_digest[org]["active"] == 4  # four rows, one entry, one slot
    assert by_digest[alice]["active"] == 2 and by_digest[bob]["active"] == 1 and by_digest[team]["active"] == 1
    assert sum(s["digest"] is not None for s in snap["slots"]) == 4  # 4 distinct adapters, 4 slots
    assert engine.metrics_snapshot()["counters"]["loads_ok"] == 4
    for h in handles:
        h.cancel()
    assert all(h.result(timeout=120).finish_reason == "cancelled" for h in handles)
    assert all(e["refs"] == 0 and e["active"] == 0 for e in engine.residency_snapshot()["ram"])


def test_a_stack_takes_all_its_slots_or_waits(levels, make_engine):
    """Two slots: a single-adapter row holds one; a 2-level stack of other adapters waits for both."""
    blobs = DictBlobs()
    org, alice, bob = (blobs.put(levels[k]) for k in ("org", "alice", "bob"))
    engine = make_engine(blobs, max_batch=4, max_active=2, max_cached=3, join_batch=1, join_wait_steps=0)
    first = engine.submit([5, 6, 7], bob, SamplingParams(max_tokens=100, ignore_eos=True))  # outlives the loads
    _step_until(engine, lambda: bool(engine._rows))
    second = engine.submit([5, 6, 7], (org, alice), SamplingParams(max_tokens=3, ignore_eos=True))
    _step_until(engine, lambda: engine.residency.counts()["ram"] == 3)  # both levels loaded, one slot free
    for _ in range(3):
        engine.step()
    assert not first.done() and not second.done()
    snap = engine.residency_snapshot()
    assert [s["digest"] for s in snap["slots"]].count(bob) == 1
    assert not any(s["digest"] in (org, alice) and s["active"] for s in snap["slots"])  # nothing half-held
    first.cancel()  # its slot frees: the stack gets both
    assert first.result(timeout=120).finish_reason == "cancelled" and second.result(timeout=120).ok


def test_a_failing_level_fails_its_rows_only_and_releases_the_others(levels, make_engine):
    blobs = DictBlobs()
    org, alice = blobs.put(levels["org"]), blobs.put(levels["alice"])
    missing = "f" * 64
    engine = make_engine(blobs, max_active=3, max_cached=4)
    results = engine.generate(["a b c", "d e f", "g h"], [(org, missing), (org, alice), None],
                              SamplingParams(max_tokens=5, ignore_eos=True))
    assert [r.ok for r in results] == [False, True, True]
    assert missing[:12] in results[0].error
    assert all(e["refs"] == 0 for e in engine.residency_snapshot()["ram"])


@pytest.mark.parametrize(("stack", "match"), [
    (("a" * 64,) * 4, "1..3 levels"),
    (("A" * 64,), "64 lowercase hex"),
    (42, "digest, a tuple of digests"),
])
def test_bad_stacks_are_refused_at_submit(make_engine, stack, match):
    engine = make_engine(DictBlobs())
    with pytest.raises(ValueError, match=match):
        engine.submit("hi", stack)


def test_the_empty_stack_is_the_base(make_engine):
    """The adapter argument is a tuple of digests, root first; () runs the base alone, like None."""
    engine = make_engine(DictBlobs())
    sampling = SamplingParams(max_tokens=5, ignore_eos=True)
    empty, none = engine.generate(["hi", "hi"], [(), None], sampling)
    assert empty.ok and none.ok and empty.text == none.text


def test_a_stack_wider_than_the_slot_table_is_refused(make_engine):
    engine = make_engine(DictBlobs(), max_active=2, max_cached=2)
    with pytest.raises(ValueError, match="max_active=2"):
        engine.submit("hi", ("a" * 64, "b" * 64, "c" * 64))


def test_shared_level_survives_churn_of_personal_levels(base, make_engine):
    """Three RAM entries, ten users one after another, each on top of the same org level: the org level is
    loaded once (each row's use keeps it hot) while the personal levels churn through the rest."""
    from lorafleet.adapters import LoraAdapter, LoraSpec  # noqa: PLC0415

    blobs = DictBlobs()
    spec = LoraSpec(rank=2, alpha=4, target_modules="attention")
    org = blobs.put(LoraAdapter.create(base, spec, seed=200, init="random"))
    users = [blobs.put(LoraAdapter.create(base, spec, seed=201 + i, init="random")) for i in range(10)]
    engine = make_engine(blobs, max_active=2, max_cached=3)
    for user in users:
        assert engine.generate(["a b"], [(org, user)], SamplingParams(max_tokens=2))[0].ok
    counters = engine.metrics_snapshot()["counters"]
    assert counters["loads_ok"] == 1 + len(users)  # the org level once, every personal level once
    assert counters["evictions_ram"] >= len(users) - 2
    assert org in {e["digest"] for e in engine.residency_snapshot()["ram"]}
