"""Exporting a revision: PEFT (loads back identically) and llama.cpp GGUF LoRA (read back with gguf's reader)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.adapters import LoraAdapter, LoraSpec, from_bytes, load_peft, to_bytes
from lorafleet.adapters.gguf_io import GGUF_FILE, permute_rows, read_gguf_lora
from lorafleet.base import load_base
from lorafleet.registry import BaseMismatchError, InvalidArgumentError, Provenance, Registry
from lorafleet.registry.exports import export_revision

REF = "acme/alice/notes"


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


@pytest.fixture
def reg(tmp_path, base):
    r = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "blobs"))
    adapter = LoraAdapter.create(base, LoraSpec(rank=4, alpha=8, target_modules="all"), seed=2, init="random")
    r.commit(REF, to_bytes(adapter, "fp16"), Provenance(base_fingerprint=base.fingerprint), aliases=("live",))
    yield r
    r.close()


def test_export_peft_loads_back(base, reg, tmp_path):
    out = export_revision(reg, base, REF, tmp_path / "peft", fmt="peft")
    assert out["address"] == f"{REF}#1" and sorted(out["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
    stored = from_bytes(reg.load(REF, base_fingerprint=base.fingerprint)[1], base)
    back = load_peft(tmp_path / "peft", base)
    assert back.spec == stored.spec and back.base_name == base.name
    for name, (A, B) in stored.weights.items():
        assert torch.equal(back.weights[name][0], A) and torch.equal(back.weights[name][1], B)


def test_export_gguf_round_trip_in_llama_cpp_layout(base, reg, tmp_path):
    export_revision(reg, base, f"{REF}#1", tmp_path / "g", fmt="gguf")
    got = read_gguf_lora(tmp_path / "g" / GGUF_FILE)
    assert (got["architecture"], got["type"], got["adapter_type"]) == ("llama", "adapter", "lora")
    assert got["alpha"] == pytest.approx(8.0)
    stored = from_bytes(reg.load(REF, base_fingerprint=base.fingerprint)[1], base)
    assert len(got["tensors"]) == 2 * len(stored.weights)
    cfg = base.config
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for module, (A, B) in stored.weights.items():
        layer, proj = module.split(".")[2], module.rsplit(".", 1)[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[proj]
        a, b = got["tensors"][f"blk.{layer}.{gname}.weight.lora_a"], got["tensors"][f"blk.{layer}.{gname}.weight.lora_b"]
        assert torch.equal(a, A)
        if proj in heads:  # llama.cpp's rows of attn_q/attn_k are RoPE-permuted: so is the delta
            assert torch.equal(b, permute_rows(B, heads[proj])) and not torch.equal(b, B)
            assert torch.allclose(b @ a, permute_rows(B @ A, heads[proj]))
        else:
            assert torch.equal(b, B)


def test_export_never_overwrites_without_force(base, reg, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="not empty; pass --force"):
        export_revision(reg, base, REF, target, fmt="peft")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    export_revision(reg, base, REF, target, fmt="peft", force=True)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgumentError, match="is a file"):
        export_revision(reg, base, REF, tmp_path / "file")
    with pytest.raises(InvalidArgumentError, match="unknown export format"):
        export_revision(reg, base, REF, tmp_path / "new", fmt="onnx")
    assert not (tmp_path / "new").exists()


def test_export_refuses_another_base(base, reg, tmp_path):
    reg.commit("acme/bob/x", reg.load(REF, base_fingerprint=base.fingerprint)[1],
               Provenance(base_fingerprint="f" * 64), aliases=("live",))
    with pytest.raises(BaseMismatchError):
        export_revision(reg, base, "acme/bob/x", tmp_path / "o", fmt="gguf")
    assert not (tmp_path / "o").exists()
