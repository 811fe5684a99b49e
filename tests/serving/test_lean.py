"""The lean decode step (serving/lean.py) equals transformers' full forward: logits of one step over a mixed batch
(base rows, adapters of several ranks, a stack) at every precision, and whole greedy generations in the engine."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafleet.adapters import LoraHost, SlotTable
from lorafleet.base import BasePrecisionError
from lorafleet.base.precision import QuantLinear, apply_precision
from lorafleet.serving.engine import Engine, EngineConfig, SamplingParams
from lorafleet.serving.kv import KVSlab
from lorafleet.serving.lean import LeanDecoder, unsupported_reason
from lorafleet.serving.sources import DictBlobs

PROMPTS = [[5, 17, 99, 3, 200, 41, 7], [150, 66], [12, 90, 33, 8, 1, 77, 140, 9, 61], [4, 4, 250, 31]]
SLOTS = [[0, -1], [-1, -1], [2, 1], [1, -1]]  # rank 2 attention / base / a stack of rank 8 all + rank 4 mlp / mlp


@pytest.fixture(scope="module", params=["fp32", "int4", "int8", "bf16"])
def setup(request, sharp, adapters):
    """``(precision, base, adapters)``: the sharpened tiny base (conftest) at each precision, its three adapters."""
    base = copy.deepcopy(sharp[1])  # the unwrapped sharpened model
    wrapped = copy.copy(sharp[0])
    wrapped.model = base
    if request.param != "fp32":  # quantize the sharpened weights (the load path would quantize the stock ones)
        apply_precision(base, request.param, source_kind="tiny")
    return request.param, wrapped, adapters


def _prefilled(model, host, table, slots):
    """A decode-ready slab holding PROMPTS (prefilled with the full forward, as the engine does) and the next ids."""
    cfg = model.config
    layers, kvh, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    width = max(map(len, PROMPTS))
    pre = KVSlab(layers, len(PROMPTS), kvh, hd, capacity=width)
    pre.count, pre.lens = len(PROMPTS), [len(p) for p in PROMPTS]
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    pads = torch.tensor([width - len(p) for p in PROMPTS])
    mask, positions = pre.prefill_chunk(0, width, pads)
    with torch.inference_mode(), host.route(table, slots):
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=pre.cache, use_cache=True)
    pre.pos = width
    slab = KVSlab(layers, len(PROMPTS), kvh, hd)
    slab.insert(pre, list(range(len(PROMPTS))))
    return slab, out.logits[:, -1].argmax(-1)


def test_one_step_logits_equal_the_full_forward(setup):
    precision, base, adapters = setup
    model = base.model
    host = LoraHost.attach(model)
    table = SlotTable(host, 4, 8)
    for slot, adapter in enumerate(adapters):
        table.load(slot, adapter)
    slots = torch.tensor(SLOTS)
    slab, nxt = _prefilled(model, host, table, slots)
    lean = LeanDecoder.of(model)
    assert lean is LeanDecoder.of(model)  # built once per model
    with torch.inference_mode(), host.route(table, slots):
        mask, positions = slab.begin_decode()
        full = model(input_ids=nxt[:, None], position_ids=positions, attention_mask=mask, cache=slab.cache,
                     use_cache=True).logits[:, -1]
        got = lean(nxt, positions, mask, slab)  # rewrites the same column with the same keys/values
        base_only = None
        with host.route(None, None):
            base_only = lean(nxt, positions, mask, slab)
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
    assert (got - base_only).abs().amax(-1)[[0, 2, 3]].min() > 1e-2  # the adapters change those rows...
    torch.testing.assert_close(got[1], base_only[1], atol=1e-5, rtol=1e-5)  # ...and not the base row
    fused = [f.kernel is not None for layer in lean.layers for f in (layer[2], layer[6])]
    # q/k/v of the tiny base cannot fuse at int4 (k is 32 rows; the pack needs blocks of 64); gate/up always can
    assert fused == ([False] * 4 if precision == "fp32" else [precision != "int4", True] * 2)


def test_engine_generations_equal_with_and_without_the_lean_step(setup):
    _, base, adapters = setup
    blobs = DictBlobs()
    digests = [blobs.put(a) for a in adapters]
    choice = [digests[0], None, (digests[2], digests[1]), digests[1], None, digests[2]]
    prompts = [*PROMPTS, [7, 8, 9], [33, 1, 200, 5, 5]]
    outs = []
    for lean in (False, True):
        engine = Engine(base, blobs, EngineConfig(max_batch=6, max_active=4, max_cached=4, max_rank=8,
                                                  lean_decode=lean))
        assert (engine._lean is not None) == lean
        res = engine.generate(prompts, choice, SamplingParams(max_tokens=12, ignore_eos=True))
        outs.append([r.token_ids for r in res])
        engine.close()
    assert outs[0] == outs[1]


def test_fused_kernel_equals_its_parts_and_parts_keep_working():
    torch.manual_seed(0)
    for kind in ("int4", "int8", "bf16"):
        parts = [QuantLinear.from_linear(torch.nn.Linear(64, n), kind) for n in (64, 128, 96)]
        x = torch.randn(3, 64)
        before = [p(x) for p in parts]
        fused = QuantLinear.fuse(parts)
        assert torch.equal(fused(x), torch.cat(before, -1)), kind
        assert all(torch.equal(p(x), b) for p, b in zip(parts, before, strict=True)), kind  # codes are now views
        assert parts[1].nbytes < fused.nbytes
    with pytest.raises(BasePrecisionError, match="blocks of 64|% 64"):
        QuantLinear.fuse([QuantLinear.from_linear(torch.nn.Linear(64, n), "int4") for n in (32, 64)])
    with pytest.raises(BasePrecisionError, match="one kind"):
        QuantLinear.fuse([QuantLinear.from_linear(torch.nn.Linear(64, 32), "int8"),
                          QuantLinear.from_linear(torch.nn.Linear(64, 32), "bf16")])


def test_other_architectures_keep_the_full_forward():
    class Other(torch.nn.Module):
        config = type("Cfg", (), {"model_type": "gemma3_text"})()

    reason = unsupported_reason(Other())
    assert reason and "gemma3_text" in reason
    with pytest.raises(ValueError, match="cannot run this base"):
        LeanDecoder(Other())
