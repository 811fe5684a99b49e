"""Purging a digest from the serving tiers (used when a user is forgotten): slot zeroed, RAM copy and pin gone,
in-flight requests cancelled, requests during the purge refused, other adapters untouched."""

from __future__ import annotations

from lorafleet.serving.params import SamplingParams


def _tiers(engine, digest: str) -> set[str]:
    snap = engine.residency_snapshot()
    where = {"slot" for s in snap["slots"] if s["digest"] == digest}
    where |= {"ram" for r in snap["ram"] if r["digest"] == digest and r["in_ram"]}
    return where | ({"entry"} if engine.residency.state(digest) else set())


def test_purge_drops_every_tier_and_zeroes_the_slot(adapters, blobs, make_engine):
    engine = make_engine(blobs, max_batch=4, max_active=2, max_cached=4)
    gone, kept = blobs.put(adapters[0]), blobs.put(adapters[1])
    before = engine.generate(["hello there"] * 2, [gone, kept], SamplingParams(max_tokens=4))
    assert all(r.ok for r in before)
    slot = next(s["slot"] for s in engine.residency_snapshot()["slots"] if s["digest"] == gone)
    engine.pin(gone)
    engine.purge(gone)
    assert _tiers(engine, gone) == set()
    assert all(float(t[slot].abs().sum()) == 0.0 for t in (*engine.table.A.values(), *engine.table.B.values()))
    assert engine.metrics_snapshot()["counters"]["purges"] == 1
    # the other adapter is untouched and still answers the same; the purged one reloads if it is still wanted
    again = engine.generate(["hello there"] * 2, [gone, kept], SamplingParams(max_tokens=4))
    assert [r.text for r in again] == [r.text for r in before]


def test_purge_cancels_requests_in_flight(adapters, blobs, make_engine):
    engine = make_engine(blobs, max_batch=4, max_active=2, max_cached=4)
    digest = blobs.put(adapters[2])
    handle = engine.submit("a long story", digest, SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(5):  # admitted and decoding
        engine.step()
    assert _tiers(engine, digest)
    engine.purge(digest, timeout=10)
    assert handle.result().finish_reason == "cancelled"
    assert _tiers(engine, digest) == set()


def test_residency_refuses_a_purge_while_a_request_holds_it(adapters, blobs, make_engine):
    engine = make_engine(blobs, max_batch=4, max_active=2, max_cached=4)
    digest = blobs.put(adapters[0])
    engine.residency.acquire(digest)
    assert engine.residency.purge(digest) is False and engine.residency.state(digest) is not None
    engine.residency.release(digest)
    assert engine.residency.purge(digest) is True
    assert engine.residency.purge(digest) is True  # nothing there: nothing to do
