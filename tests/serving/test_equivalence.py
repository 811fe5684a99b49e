"""Greedy output of every request in a mixed, continuously batched run equals that request alone in
transformers ``generate`` with its adapter loaded by peft."""

from __future__ import annotations

import torch

from lorafleet.serving.engine import SamplingParams


def _prompts(base, n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 24, (n,), generator=g).tolist()
    return [torch.randint(3, 250, (k,), generator=g).tolist() for k in lengths]


def test_mixed_batch_with_joins_equals_each_request_alone(base, adapters, blobs, make_engine, reference):
    digests = [blobs.put(a) for a in adapters]
    choice = [0, None, 2, 1, None, 2, 0, 1, 2, None]  # several ranks and base rows
    prompts = _prompts(base, len(choice))
    max_new = [14, 9, 17, 6, 12, 15, 8, 16, 11, 13]
    engine = make_engine(blobs, max_batch=6, max_active=3, max_cached=3, max_prefill_tokens=40)

    handles = []

    def submit(i):
        d = None if choice[i] is None else digests[choice[i]]
        handles.append((i, engine.submit(prompts[i], d, SamplingParams(max_tokens=max_new[i]))))

    for i in range(3):
        submit(i)
    for _ in range(4):
        engine.step()
    for i in range(3, 7):  # join mid-flight, different prompt lengths
        submit(i)
        engine.step()
    for _ in range(3):
        engine.step()
    for i in range(7, 10):
        submit(i)
    results = {i: h.result(timeout=120) for i, h in handles}

    assert engine.metrics_snapshot()["counters"]["decode_steps"] > 0
    for i, res in results.items():
        assert res.ok, res.error
        adapter = None if choice[i] is None else adapters[choice[i]]
        want = reference(prompts[i], adapter, max_new[i])
        assert res.token_ids == want, f"request {i} (adapter {choice[i]})"
        assert res.completion_tokens == len(want)
        assert res.finish_reason in ("stop", "length")

    # The adapters do change the output (so the comparison can fail).
    base_out = reference(prompts[2], None, max_new[2])
    assert results[2].token_ids != base_out


def test_chunked_prefill_and_kv_relocation(base, adapters, blobs, make_engine, reference):
    """Prompts longer than the prefill budget are prefilled in chunks; long completions outgrow the slab."""
    digests = [blobs.put(a) for a in adapters]
    prompts = _prompts(base, 4, seed=3)
    prompts[0] = prompts[0] * 4  # long prompt: several chunks
    engine = make_engine(blobs, max_batch=4, max_active=2, max_cached=3, max_prefill_tokens=16)
    results = engine.generate(prompts, [digests[2], None, digests[0], digests[2]],
                              SamplingParams(max_tokens=90, ignore_eos=True))
    for prompt, adapter, res in zip(prompts, [adapters[2], None, adapters[0], adapters[2]], results, strict=True):
        assert res.token_ids == reference(prompt, adapter, 90, ignore_eos=True)
        assert res.finish_reason == "length"
    assert engine.slab.relocations > 0
    assert engine.metrics_snapshot()["counters"]["prefill_chunks"] > 2


def test_many_rows_one_adapter_and_batch_of_one(base, adapters, blobs, make_engine, reference):
    digest = blobs.put(adapters[1])
    prompts = _prompts(base, 5, seed=9)
    engine = make_engine(blobs, max_batch=8, max_active=1, max_cached=1)
    results = engine.generate(prompts, digest, SamplingParams(max_tokens=10))
    for prompt, res in zip(prompts, results, strict=True):
        assert res.token_ids == reference(prompt, adapters[1], 10)
    solo = make_engine(blobs, max_batch=1, max_active=1, max_cached=1)
    res = solo.generate(prompts[:3], [digest, None, digest], SamplingParams(max_tokens=10))
    assert [r.token_ids for r in res] == [reference(prompts[0], adapters[1], 10), reference(prompts[1], None, 10),
                                          reference(prompts[2], adapters[1], 10)]
