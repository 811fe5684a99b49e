"""Residency by digest: frequency protection (scans do not flush regulars), pinning, in-use adapters never
evicted, prefetch, and heavy churn through one slot and two RAM entries without a single error."""

from __future__ import annotations

import random
import time

import pytest

from lorafleet.adapters import LoraAdapter, LoraSpec
from lorafleet.serving.engine import SamplingParams
from lorafleet.serving.residency import LRUPolicy, SLRUPolicy
from lorafleet.serving.sources import DictBlobs

GREEDY4 = SamplingParams(max_tokens=4, ignore_eos=True)


def _simulate(policy, capacity: int, trace: list[str]) -> set[str]:
    """Run a trace through a policy the way Residency does (evict the first victim when full)."""
    resident: set[str] = set()
    for key in trace:
        if key in resident:
            policy.touch(key)
            continue
        if len(resident) >= capacity:
            victim = next(policy.victims())
            policy.remove(victim)
            resident.discard(victim)
        policy.insert(key)
        resident.add(key)
    return resident


def test_slru_keeps_regulars_through_a_scan_and_lru_does_not():
    trace = ["a", "b", "a", "b", "a"] + [f"scan{i}" for i in range(20)]
    assert {"a", "b"} <= _simulate(SLRUPolicy(4, 0.5), 4, trace)
    assert not {"a", "b"} & _simulate(LRUPolicy(4), 4, trace)


def test_slru_protected_overflow_is_demoted_not_dropped():
    policy = SLRUPolicy(4, 0.5)  # protected holds 2
    for k in "abc":
        policy.insert(k)
        policy.touch(k)  # second use: promote
    assert list(policy.protected) == ["b", "c"]
    assert list(policy.probation) == ["a"]  # demoted to probation, still cached
    assert next(policy.victims()) == "a"


@pytest.fixture(scope="module")
def many(base):
    """40 small distinct adapters (rank 2, attention) and their blobs."""
    blobs = DictBlobs()
    adapters = [LoraAdapter.create(base, LoraSpec(rank=2, alpha=8, target_modules="attention"), seed=100 + i,
                                   init="random") for i in range(40)]
    return blobs, adapters, [blobs.put(a) for a in adapters]


def _counters(engine):
    return engine.metrics_snapshot()["counters"]


def test_scan_does_not_flush_regulars(many, make_engine):
    blobs, _, digests = many
    regulars, scan = digests[:2], digests[2:14]
    engine = make_engine(blobs, max_active=1, max_cached=4, protected_fraction=0.5)
    for _ in range(2):  # two uses each: protected
        for d in regulars:
            assert engine.generate(["hi"], d, GREEDY4)[0].ok
    for d in scan:  # one-off users
        assert engine.generate(["hi"], d, GREEDY4)[0].ok
    before = _counters(engine)
    for d in regulars:
        assert engine.generate(["hi"], d, GREEDY4)[0].ok
    after = _counters(engine)
    assert after["misses"] == before["misses"]  # both regulars still in RAM
    assert after["hits_ram"] + after["hits_slot"] == before["hits_ram"] + before["hits_slot"] + 2
    resident = {e["digest"]: e["segment"] for e in engine.residency_snapshot()["ram"]}
    assert resident[regulars[0]] == resident[regulars[1]] == "protected"


def test_lru_policy_is_flushed_by_the_same_scan(many, make_engine):
    blobs, _, digests = many
    engine = make_engine(blobs, max_active=1, max_cached=4, cache_policy="lru")
    for d in digests[:2] * 2 + digests[2:14]:
        engine.generate(["hi"], d, GREEDY4)
    resident = {e["digest"] for e in engine.residency_snapshot()["ram"]}
    assert not resident & set(digests[:2])


def test_pinned_adapter_survives_churn(many, make_engine):
    blobs, _, digests = many
    # Plain LRU, so what keeps the adapter is the pin alone (SLRU would also protect a twice-used one).
    engine = make_engine(blobs, max_active=1, max_cached=2, cache_policy="lru")  # one pin allowed
    engine.pin(digests[0])
    for d in digests[1:12]:
        assert engine.generate(["hi"], d, GREEDY4)[0].ok
    assert digests[0] in {e["digest"] for e in engine.residency_snapshot()["ram"]}
    misses = _counters(engine)["misses"]
    assert engine.generate(["hi"], digests[0], GREEDY4)[0].ok
    assert _counters(engine)["misses"] == misses
    with pytest.raises(ValueError, match="max_cached - max_active"):
        engine.pin(digests[1])
    with pytest.raises(ValueError, match="max_cached - max_active"):
        make_engine(blobs, max_active=1, max_cached=1).pin(digests[0])
    engine.unpin(digests[0])
    for d in digests[12:20]:
        engine.generate(["hi"], d, GREEDY4)
    assert digests[0] not in {e["digest"] for e in engine.residency_snapshot()["ram"]}


def test_in_use_adapter_is_never_evicted(many, make_engine, base):
    blobs, _, digests = many
    engine = make_engine(blobs, max_batch=4, max_active=1, max_cached=2)
    long = engine.submit("a long one", digests[0], SamplingParams(max_tokens=30, ignore_eos=True))
    while not engine.residency_snapshot()["slots"][0]["digest"]:
        engine.step()
    others = [engine.submit("hi", d, GREEDY4) for d in digests[1:6]]
    for _ in range(10):  # the others want the only slot and RAM; the running adapter must stay
        engine.step()
        snap = engine.residency_snapshot()
        assert snap["slots"][0]["digest"] == digests[0]
        assert digests[0] in {e["digest"] for e in snap["ram"]}
    results = [long.result(timeout=60)] + [h.result(timeout=60) for h in others]
    assert all(r.ok for r in results)
    alone = make_engine(blobs, max_active=1, max_cached=1)
    assert results[0].token_ids == alone.generate(["a long one"], digests[0],
                                                  SamplingParams(max_tokens=30, ignore_eos=True))[0].token_ids
    assert _counters(engine)["evictions_ram"] >= 3


def test_churn_one_slot_two_cached_many_adapters(many, make_engine):
    blobs, _, digests = many
    rng = random.Random(0)
    picks = [rng.choice(digests + [None]) for _ in range(80)]
    prompts = [f"user {i}" for i in range(len(picks))]
    churn = make_engine(blobs, max_batch=8, max_active=1, max_cached=2)
    got = churn.generate(prompts, picks, GREEDY4)
    assert all(r.ok for r in got), [r.error for r in got if not r.ok]
    roomy = make_engine(blobs, max_batch=8, max_active=16, max_cached=48)
    want = roomy.generate(prompts, picks, GREEDY4)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    c = _counters(churn)
    assert c["requests_failed"] == 0 and c["evictions_ram"] > 10 and c["slot_loads"] > 20
    assert len(churn.residency_snapshot()["ram"]) <= 2


def test_churn_in_background_thread(many, make_engine):
    blobs, _, digests = many
    engine = make_engine(blobs, max_batch=6, max_active=1, max_cached=2).start()
    rng = random.Random(1)
    handles = [engine.submit(f"q{i}", rng.choice(digests), GREEDY4) for i in range(40)]
    assert all(h.result(timeout=120).ok for h in handles)
    engine.stop()


def test_prefetch_makes_the_first_request_a_hit(many, make_engine):
    blobs, _, digests = many
    engine = make_engine(blobs, max_active=2, max_cached=4)
    engine.prefetch([digests[30]])
    deadline = time.monotonic() + 30
    while engine.residency.state(digests[30]) != "ready" and time.monotonic() < deadline:
        engine.step()
        time.sleep(0.005)
    assert engine.residency.state(digests[30]) == "ready"
    assert engine.generate(["hi"], digests[30], GREEDY4)[0].ok
    c = _counters(engine)
    assert c["prefetches"] == 1 and c["misses"] == 0 and c["hits_ram"] == 1


def test_metrics_and_snapshot(many, make_engine):
    blobs, _, digests = many
    engine = make_engine(blobs, max_active=2, max_cached=3)
    engine.generate(["a", "b", "c"], [digests[0], digests[1], digests[0]], GREEDY4)
    m = engine.metrics_snapshot()
    assert m["counters"]["tokens_generated"] == 12
    assert m["histograms"]["load_latency"]["count"] == 2
    assert m["histograms"]["decode_step"]["count"] >= 3
    assert {"running", "queue_loading", "queue_ready", "adapters_in_ram"} <= set(m["gauges"])
    snap = engine.residency_snapshot()
    assert {s["digest"] for s in snap["slots"]} == {digests[0], digests[1]}
    assert snap["policy"] == "slru" and snap["slot_table_bytes"] > 0
    assert all(e["bytes"] > 0 and not e["in_ram"] for e in snap["ram"])  # in a slot: no second copy in RAM
    assert snap["ram_bytes"] == 0


def test_slot_reuse_copies_a_cached_adapter_back_out(many, make_engine):
    """Exclusive tiers: two cached adapters alternate through one slot; each switch copies the old one out."""
    blobs, _, digests = many
    a, b = digests[0], digests[1]
    engine = make_engine(blobs, max_active=1, max_cached=3)
    want = {d: make_engine(blobs, max_active=1, max_cached=1).generate(["hi there"], d, GREEDY4)[0].token_ids
            for d in (a, b)}
    for d in (a, b, a, b, a):
        assert engine.generate(["hi there"], d, GREEDY4)[0].token_ids == want[d]
    c = _counters(engine)
    assert c["misses"] == 2 and c["hits_ram"] == 3 and c["evictions_slot"] == 4
    in_ram = {e["digest"]: e["in_ram"] for e in engine.residency_snapshot()["ram"]}
    assert in_ram == {a: False, b: True}
