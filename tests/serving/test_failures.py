"""Cache keys are digests (a re-committed name serves the new revision), and an adapter that cannot be loaded
(missing, corrupt, malformed, wrong base, too large a rank) fails its own request only."""

from __future__ import annotations

import threading

import pytest
import torch

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.digest import digest_of
from lorafleet.serving.engine import SamplingParams
from lorafleet.serving.sources import DictBlobs, DirBlobs

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
PROMPTS = ["first prompt", "second one", "third", "and a fourth prompt"]


def _mixed_run(engine, bad_digest, good_digest):
    """A bad request among good ones (base and adapter), all in the same batch."""
    return engine.generate(PROMPTS, [None, bad_digest, good_digest, None], GREEDY)


def _assert_only_bad_failed(results, reference_results, match):
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].finish_reason == "error"
    assert match in results[1].error, results[1].error
    for got, want in zip(results, reference_results, strict=True):
        if got.ok:
            assert got.token_ids == want.token_ids


@pytest.fixture
def solo_results(adapters, make_engine):
    blobs = DictBlobs()
    good = blobs.put(adapters[0])
    engine = make_engine(blobs)
    return engine.generate(PROMPTS, [None, None, good, None], GREEDY)


def test_recommitted_name_serves_new_revision_dict(base, make_engine, make_adapter, reference):
    """A name -> digest table moves; the engine keys everything by digest, so it serves the new weights."""
    blobs = DictBlobs()
    v1, v2 = make_adapter(4, "all", 11), make_adapter(4, "all", 12)
    names = {"acme/alice/assistant": blobs.put(v1)}
    engine = make_engine(blobs)
    prompt = base.tokenizer("hello", add_special_tokens=False)["input_ids"]
    first = engine.generate([prompt], names["acme/alice/assistant"], GREEDY)[0]
    names["acme/alice/assistant"] = blobs.put(v2)  # re-commit under the same name
    second = engine.generate([prompt], names["acme/alice/assistant"], GREEDY)[0]
    assert first.token_ids == reference(prompt, v1, 12, ignore_eos=True)
    assert second.token_ids == reference(prompt, v2, 12, ignore_eos=True)
    assert first.token_ids != second.token_ids


@pytest.mark.parametrize("damage", ["delete", "corrupt", "truncate"])
def test_damaged_file_while_cold_fails_only_its_request(adapters, make_engine, solo_results, tmp_path, damage):
    blobs = DirBlobs(tmp_path / "blobs")
    bad, good = blobs.put(adapters[2]), blobs.put(adapters[0])
    engine = make_engine(blobs, verify_digest=damage != "truncate")  # truncation is caught by the parser too
    path = blobs.path(bad)
    if damage == "delete":
        path.unlink()
        match = "missing"
    elif damage == "corrupt":
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
        match = "corrupt"
    else:
        path.write_bytes(path.read_bytes()[:100])
        match = "truncated or malformed"
    _assert_only_bad_failed(_mixed_run(engine, bad, good), solo_results, match)
    assert engine.metrics_snapshot()["counters"]["load_failures"] == 1


def test_file_deleted_after_eviction_fails_next_request(adapters, make_engine, tmp_path):
    """Warm once, evicted (cold again), then deleted on disk: the next request for it gets a clear error."""
    blobs = DirBlobs(tmp_path / "blobs")
    a, b = blobs.put(adapters[0]), blobs.put(adapters[1])
    engine = make_engine(blobs, max_active=1, max_cached=1)
    assert engine.generate(["x"], a, GREEDY)[0].ok
    assert engine.generate(["x"], b, GREEDY)[0].ok  # evicts a
    blobs.path(a).unlink()
    res = engine.generate(["x", "y"], [a, b], GREEDY)
    assert not res[0].ok and "missing" in res[0].error
    assert res[1].ok


def _wrong_shape_adapter(base) -> LoraAdapter:
    """An adapter made for a base with another hidden size."""
    good = LoraAdapter.create(base, LoraSpec(rank=2, target_modules="q_proj"), init="random")
    weights = {k: (torch.randn(2, 32), torch.randn(32, 2)) for k in good.weights}
    return LoraAdapter(spec=good.spec, weights=weights)


def _huge_adapter(base) -> LoraAdapter:
    """Finite but absurd: every tensor of a real adapter x 1e30 (passes the finiteness check)."""
    good = LoraAdapter.create(base, LoraSpec(rank=2, target_modules="all"), seed=5, init="random")
    return LoraAdapter(spec=good.spec, weights={k: (A * 1e30, B * 1e30) for k, (A, B) in good.weights.items()})


@pytest.mark.parametrize(
    ("make_bad", "match"),
    [
        (_wrong_shape_adapter, "do not fit base"),
        (_huge_adapter, "over the bound of 1000x"),
        (lambda base: LoraAdapter.create(base, LoraSpec(rank=16, alpha=16), init="random"),
         "exceeds EngineConfig.max_rank"),
        (lambda base: b"not an adapter at all", "not a safetensors file"),
    ],
)
def test_invalid_adapter_fails_only_its_request(base, adapters, make_engine, solo_results, make_bad, match):
    blobs = DictBlobs()
    bad_item = make_bad(base)
    bad = blobs.put(bad_item if isinstance(bad_item, bytes) else to_bytes(bad_item))
    good = blobs.put(adapters[0])
    engine = make_engine(blobs)
    _assert_only_bad_failed(_mixed_run(engine, bad, good), solo_results, match)


def test_fetch_errors_of_any_kind_are_contained(adapters, make_engine, solo_results):
    good_blobs = DictBlobs()
    good = good_blobs.put(adapters[0])
    bad = "f" * 64

    def fetch(digest):
        if digest == bad:
            raise OSError("connection reset by blob store")
        return good_blobs(digest)

    engine = make_engine(fetch)
    _assert_only_bad_failed(_mixed_run(engine, bad, good), solo_results, "connection reset")


def test_cold_load_does_not_block_decoding(adapters, make_engine):
    """A slow fetch holds only its own request; the others finish meanwhile."""
    blobs = DictBlobs()
    slow = blobs.put(adapters[1])
    gate = threading.Event()

    def fetch(digest):
        gate.wait(30)
        return blobs(digest)

    engine = make_engine(fetch).start()
    waiting = engine.submit("cold one", slow, GREEDY)
    fast = [engine.submit(p, None, SamplingParams(max_tokens=20, ignore_eos=True)) for p in PROMPTS]
    assert all(h.result(timeout=60).ok for h in fast)
    assert not waiting.done()
    assert engine.metrics_snapshot()["gauges"]["queue_loading"] == 1
    gate.set()
    assert waiting.result(timeout=60).ok
    engine.stop()


# -- through the registry ----------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path):
    reg_mod = pytest.importorskip("lorafleet.registry")
    reg = reg_mod.Registry(f"sqlite:///{tmp_path / 'registry.db'}", str(tmp_path / "blobs"))
    yield reg_mod, reg
    reg.close()


def test_registry_recommit_serves_new_revision(base, registry, make_engine, make_adapter, reference):
    reg_mod, reg = registry
    v1, v2 = make_adapter(4, "attention", 21), make_adapter(4, "attention", 22)
    prov = reg_mod.Provenance(base_fingerprint=base.fingerprint)
    engine = make_engine(reg.read_blob)
    prompt = base.tokenizer("hello there", add_special_tokens=False)["input_ids"]

    reg.commit("acme/alice/assistant", to_bytes(v1), prov, aliases=["live"])
    d1 = reg.resolve("acme/alice/assistant@live").digest
    first = engine.generate([prompt], d1, GREEDY)[0]
    reg.commit("acme/alice/assistant", to_bytes(v2), prov, aliases=["live"])
    d2 = reg.resolve("acme/alice/assistant@live").digest
    second = engine.generate([prompt], d2, GREEDY)[0]

    assert d1 != d2 and d2 == digest_of(to_bytes(v2))
    assert first.token_ids == reference(prompt, v1, 12, ignore_eos=True)
    assert second.token_ids == reference(prompt, v2, 12, ignore_eos=True)
    assert {e["digest"] for e in engine.residency_snapshot()["ram"]} == {d1, d2}


@pytest.mark.parametrize(("damage", "error"), [("delete", "MissingBlobError"), ("corrupt", "CorruptBlobError")])
def test_registry_blob_damaged_while_cold(base, adapters, registry, make_engine, solo_results, damage, error):
    reg_mod, reg = registry
    prov = reg_mod.Provenance(base_fingerprint=base.fingerprint)
    bad = reg.commit("acme/bob/assistant", to_bytes(adapters[2]), prov).digest
    good = reg.commit("acme/carol/assistant", to_bytes(adapters[0]), prov).digest
    path = reg.blobs.path(bad)
    if damage == "delete":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    engine = make_engine(reg.read_blob)
    _assert_only_bad_failed(_mixed_run(engine, bad, good), solo_results, error)


def test_failures_are_not_cached(adapters, make_engine, reference, base):
    """A transient fetch error fails that request; the next request for the digest loads it afresh."""
    blobs = DictBlobs()
    digest = blobs.put(adapters[0])
    calls = []

    def flaky(d):
        calls.append(d)
        if len(calls) == 1:
            raise TimeoutError("blob store timed out")
        return blobs(d)

    engine = make_engine(flaky)
    first = engine.generate(["again"], digest, GREEDY)[0]
    assert not first.ok and "timed out" in first.error
    second = engine.generate(["again"], digest, GREEDY)[0]
    assert second.ok and len(calls) == 2
    prompt = base.tokenizer("again", add_special_tokens=False)["input_ids"]
    assert second.token_ids == reference(prompt, adapters[0], 12, ignore_eos=True)


def test_engine_error_fails_in_flight_requests_and_engine_recovers(blobs, make_engine, monkeypatch):
    engine = make_engine(blobs)
    handles = [engine.submit(p, None, SamplingParams(max_tokens=20, ignore_eos=True)) for p in PROMPTS]
    engine.step()
    real = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda: (_ for _ in ()).throw(RuntimeError("simulated kernel failure")))
    engine.step()
    results = [h.result(timeout=5) for h in handles]
    assert all(r.finish_reason == "error" and "simulated kernel failure" in r.error for r in results)
    monkeypatch.setattr(engine, "_decode", real)
    assert engine.generate(["after"], None, GREEDY)[0].ok
    assert engine.residency_snapshot()["slots"] and engine.metrics_snapshot()["gauges"]["running"] == 0


def test_nonfinite_logits_fail_only_their_row(base, adapters, make_engine, solo_results, monkeypatch):
    """Defence in depth behind the load-time bound (e.g. a blob stored before it existed): with the bound lifted,
    the x 1e30 adapter loads and its row's logits overflow to NaN; that row fails with a clear error (never an
    empty "success"), every other row of the same batch is token for token what it is alone, and the next batch
    is served normally."""
    from lorafleet.adapters import weights as weights_mod
    from lorafleet.serving.engine import NONFINITE

    monkeypatch.setattr(weights_mod, "MAX_DELTA_RATIO", float("inf"))
    blobs = DictBlobs()
    bad = blobs.put(to_bytes(_huge_adapter(base)))
    good = blobs.put(adapters[0])
    engine = make_engine(blobs)
    for sampling in (GREEDY, SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=3)):
        results = engine.generate(PROMPTS, [None, bad, good, None], sampling)
        assert [r.ok for r in results] == [True, False, True, True]
        assert results[1].finish_reason == "error" and results[1].error.startswith(NONFINITE), results[1].error
        assert results[1].text == ""
    _assert_only_bad_failed(_mixed_run(engine, bad, good), solo_results, NONFINITE)
    assert engine.metrics_snapshot()["counters"]["nonfinite_rows"] >= 3
    assert all(r.ok for r in engine.generate(PROMPTS, [None, good, good, None], GREEDY))
