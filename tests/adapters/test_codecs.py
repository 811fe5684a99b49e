"""Storage codecs: round trips within each codec's error bound, sizes, content addressing, and refused blobs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lorafleet.adapters import AdapterError, LoraAdapter, LoraSpec, codecs, decode_blob, from_bytes, to_bytes
from lorafleet.adapters.peft_io import META_KEY


@pytest.fixture(scope="module")
def adapter(tiny_base):
    return LoraAdapter.create(tiny_base, LoraSpec(rank=4, target_modules="all"), seed=3, init="random")


def _metadata(blob: bytes) -> dict:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n])["__metadata__"]


# codec, bound on |error| relative to the absmax of the quantization unit (row / group / tensor)
BOUNDS = [("fp32", 0.0), ("fp16", 1e-3), ("int8", 0.5 / 127 + 1e-3), ("q4", 0.5 / 7 + 1e-3)]


@pytest.mark.parametrize(("codec", "bound"), BOUNDS)
def test_round_trip_within_the_codec_bound(tiny_base, adapter, codec, bound):
    back = from_bytes(to_bytes(adapter, codec), tiny_base)
    assert back.meta["codec"] == codec
    for name, (A, B) in adapter.weights.items():
        for want, got in ((A, back.weights[name][0]), (B, back.weights[name][1])):
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert (got - want).abs().max() <= bound * want.abs().max() + 1e-12


def test_sizes_shrink_with_the_codec_and_bytes_are_content_addressed(adapter):
    sizes = {c: len(to_bytes(adapter, c)) for c in codecs.CODECS}
    assert sizes["q4"] < sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    n = adapter.num_parameters
    assert sizes["q4"] < 0.5 * n + 2 * n / 64 + 1500  # 4 bits a value + a scale per group + a small header
    assert to_bytes(adapter, "int8") == to_bytes(adapter, "int8")  # same weights + codec = same digest
    assert len({to_bytes(adapter, c) for c in codecs.CODECS}) == len(codecs.CODECS)


def _storage(blob: bytes) -> dict | None:
    return json.loads(_metadata(blob)[META_KEY]).get(codecs.STORAGE_KEY)


def test_no_codec_keeps_the_per_tensor_layout(adapter):
    blob = to_bytes(adapter)
    assert _storage(blob) is None
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in st_load(blob))
    assert decode_blob(blob).meta["codec"] == "none"


def test_int8_scales_run_along_the_longer_axis(tiny_base):
    """A rank-1 B (out, 1) is one row of ``out`` values: one scale, not ``out`` of them."""
    a = LoraAdapter.create(tiny_base, LoraSpec(rank=1, target_modules="q_proj"), init="random")
    stored = st_load(to_bytes(a, "int8"))
    assert stored["scale"].numel() == 2 * len(a.weights)  # one for A (1, in), one for B (out, 1)


def test_q4_group_size_is_recorded(adapter):
    for group in codecs.Q4_GROUPS:
        assert _storage(to_bytes(adapter, "q4", group=group))["group"] == group


def _tamper(blob: bytes, *, tensors=None, codec_meta=None) -> bytes:
    stored = st_load(blob)
    meta = _metadata(blob)
    if tensors is not None:
        stored = tensors(stored)
    if codec_meta is not None:
        cfg = json.loads(meta[META_KEY])
        cfg[codecs.STORAGE_KEY] = codec_meta(cfg[codecs.STORAGE_KEY])
        meta[META_KEY] = json.dumps(cfg)
    return st_save(stored, metadata=meta)


ERROR_CASES = [
    ("int8", {"codec_meta": lambda m: {**m, "codec": "int3"}}, "codec 'int3' is unknown"),
    ("int8", {"codec_meta": lambda m: "int8"}, "codec 'int8' is unknown"),
    ("int8", {"codec_meta": lambda m: {**m, "layout": "!!"}}, "layout is malformed"),
    ("q4", {"codec_meta": lambda m: {**m, "group": 48}}, "group must be one of"),
    ("int8", {"tensors": lambda t: {**t, "q": t["q"][:-1]}}, "do not fit the layout"),
    ("q4", {"tensors": lambda t: {**t, "scale": t["scale"][:-1]}}, "do not hold"),
    ("fp16", {"tensors": lambda t: {"values": torch.full_like(t["values"], float("nan"))}}, "NaN or Inf"),
    ("fp16", {"tensors": lambda t: {"values": t["values"].float()}}, "expected torch.float16"),
    ("int8", {"tensors": lambda t: {**t, "extra": t["scale"].clone()}}, "exactly the tensors"),
]


@pytest.mark.parametrize(("codec", "change", "match"), ERROR_CASES)
def test_damaged_blobs_are_refused_with_the_reason(adapter, codec, change, match):
    bad = _tamper(to_bytes(adapter, codec), **change)
    with pytest.raises(AdapterError, match=match):
        from_bytes(bad)


def test_layout_bomb_is_refused(adapter):
    import base64
    import zlib

    bomb = base64.b64encode(zlib.compress(b"[" + b" " * (codecs.MAX_LAYOUT_BYTES + 10) + b"]")).decode()
    bad = _tamper(to_bytes(adapter, "fp16"), codec_meta=lambda m: {**m, "layout": bomb})
    with pytest.raises(AdapterError, match="layout is malformed"):
        from_bytes(bad)


@pytest.mark.parametrize(("codec", "group"), [("int4", 64), ("q4", 16)])
def test_unknown_codec_or_group_on_write(adapter, codec, group):
    with pytest.raises(AdapterError, match="codec|group"):
        to_bytes(adapter, codec, group=group)


def test_spec_metadata_is_kept(adapter):
    assert json.loads(_metadata(to_bytes(adapter, "q4"))[META_KEY])["rank"] == 4
