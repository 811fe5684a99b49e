"""PEFT-format interop both ways, canonical bytes, and every bad input refused with a clear error."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

from lorafleet.adapters import (
    AdapterError,
    LoraAdapter,
    LoraHost,
    LoraSpec,
    StackedWeights,
    from_bytes,
    load_peft,
    save_peft,
    to_bytes,
)


@pytest.fixture()
def adapter(tiny_base):
    return LoraAdapter.create(tiny_base, LoraSpec(rank=4, alpha=8, target_modules="all"), seed=3, init="random")


def _our_logits(base, adapter, ids):
    host = LoraHost.attach(base.model)
    with torch.no_grad(), host.route(StackedWeights([adapter]), [0] * ids.shape[0]):
        return base.model(ids).logits


def test_lorafleet_adapter_loads_in_peft_with_same_logits(tiny_base, plain_tiny_model, adapter, tmp_path):
    save_peft(adapter, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(plain_tiny_model), tmp_path / "a")
    ids = torch.randint(3, 250, (2, 9))
    with torch.no_grad():
        ref = peft_model(ids).logits
    assert (ref - _our_logits(tiny_base, adapter, ids)).abs().max().item() <= 1e-5


def test_peft_adapter_loads_in_lorafleet_with_same_logits(tiny_base, plain_tiny_model, tmp_path):
    torch.manual_seed(11)
    config = LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        init_lora_weights=False)  # non-zero B, so the adapter matters
    peft_model = get_peft_model(copy.deepcopy(plain_tiny_model), config)
    peft_model.save_pretrained(tmp_path / "p")
    loaded = load_peft(tmp_path / "p", tiny_base)
    assert loaded.spec.rank == 6 and loaded.spec.target_modules == ("down_proj", "q_proj", "v_proj")
    ids = torch.randint(3, 250, (2, 9))
    with torch.no_grad():
        ref = peft_model(ids).logits
        base_only = plain_tiny_model(ids).logits
    ours = _our_logits(tiny_base, loaded, ids)
    assert (ref - ours).abs().max().item() <= 1e-5
    assert (ref - base_only).abs().max().item() > 1e-3


def test_save_load_roundtrip_and_canonical_bytes(tiny_base, adapter, tmp_path):
    save_peft(adapter, tmp_path / "a")
    again = load_peft(tmp_path / "a", tiny_base)
    assert to_bytes(again) == to_bytes(adapter)  # canonical: same content, same bytes
    parsed = from_bytes(to_bytes(adapter), tiny_base)
    assert parsed.spec == adapter.spec
    for name, (A, B) in adapter.weights.items():
        assert torch.equal(parsed.weights[name][0], A) and torch.equal(parsed.weights[name][1], B)
    other = LoraAdapter.create(tiny_base, adapter.spec, seed=4, init="random")
    assert to_bytes(other) != to_bytes(adapter)


def test_size_report(tiny_base, adapter):
    summary = adapter.summary(tiny_base)
    assert summary["parameters"] == adapter.num_parameters > 0
    assert summary["bytes"] == 4 * adapter.num_parameters
    assert 0 < summary["percent_of_base"] < 100


# ---- bad inputs: each a clear error naming the problem, nothing half-loaded -------------------------------

@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank must be an integer in 1..64"),
        ({"rank": -3}, "rank must be an integer"),
        ({"rank": 65}, "rank must be an integer"),
        ({"rank": 2.5}, "rank must be an integer"),
        ({"alpha": 0}, "alpha must be a positive"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"target_modules": ("q_proj", "qkv_proj")}, r"unknown target module\(s\) \['qkv_proj'\]"),
        ({"target_modules": ()}, "no target module given"),
    ],
)
def test_bad_spec(kwargs, match):
    with pytest.raises(AdapterError, match=match):
        LoraSpec(**kwargs)


def _corrupt(directory, kind, tiny_base):
    weights = directory / "adapter_model.safetensors"
    config = directory / "adapter_config.json"
    if kind == "missing_weights":
        weights.unlink()
    elif kind == "missing_config":
        config.unlink()
    elif kind == "pickle_only":
        weights.unlink()
        (directory / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle, never opened")
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:-40])
    elif kind == "not_safetensors":
        weights.write_bytes(b"PK\x03\x04 this is a zip")
    elif kind in ("nan", "inf", "wrong_shape", "extra_tensor", "rank_mismatch", "prefix"):
        from safetensors.torch import load_file

        tensors = load_file(weights)
        key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
        if kind == "nan":
            tensors[key][0, 0] = float("nan")
        elif kind == "inf":
            tensors[key][0, 0] = float("inf")
        elif kind == "wrong_shape":
            a_key = key.replace("lora_B", "lora_A")
            tensors[a_key] = torch.zeros(tensors[a_key].shape[0], tensors[a_key].shape[1] + 3)
        elif kind == "extra_tensor":
            tensors[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.ones(4)
        elif kind == "rank_mismatch":
            tensors[key] = torch.zeros(tensors[key].shape[0], 2)
        elif kind == "prefix":
            tensors = {k.replace("model.layers", "transformer.h"): v for k, v in tensors.items()}
        save_file(tensors, weights)
    elif kind == "bad_json":
        config.write_text("{not json")
    elif kind == "dora":
        cfg = json.loads(config.read_text())
        cfg["use_dora"] = True
        config.write_text(json.dumps(cfg))
    elif kind == "zero_rank_config":
        cfg = json.loads(config.read_text())
        cfg["r"] = 0
        config.write_text(json.dumps(cfg))
    elif kind == "unknown_target":
        cfg = json.loads(config.read_text())
        cfg["target_modules"] = ["q_proj", "attn.c_attn"]
        config.write_text(json.dumps(cfg))


BAD_DIRS = [
    ("missing_weights", "no adapter_model.safetensors"),
    ("missing_config", "no adapter_config.json"),
    ("pickle_only", "pickle weights .*never loaded"),
    ("truncated", "truncated or malformed safetensors"),
    ("not_safetensors", "not a safetensors file"),
    ("nan", "NaN or Inf"),
    ("inf", "NaN or Inf"),
    ("wrong_shape", "do not fit base"),
    ("extra_tensor", "unexpected tensor .*lora_magnitude_vector"),
    ("rank_mismatch", "do not match rank"),
    ("prefix", "does not exist in base"),
    ("bad_json", "not valid JSON"),
    ("dora", "use_dora=True is not supported"),
    ("zero_rank_config", "rank must be an integer"),
    ("unknown_target", "unknown target module"),
]


@pytest.mark.parametrize(("kind", "match"), BAD_DIRS)
def test_bad_peft_directory(tiny_base, adapter, tmp_path, kind, match):
    directory = save_peft(adapter, tmp_path / kind)
    _corrupt(directory, kind, tiny_base)
    with pytest.raises(AdapterError, match=match):
        load_peft(directory, tiny_base)


def test_missing_directory(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load_peft(tmp_path / "nope")


def test_pickle_is_never_unpickled(tmp_path, monkeypatch):
    import pickle

    def boom(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(AdapterError, match="pickle"):
        load_peft(tmp_path)


def test_adapter_with_other_dims_refused(tiny_base, adapter):
    wrong = LoraAdapter(spec=adapter.spec, weights={k: (torch.zeros(4, 7), torch.zeros(9, 4)) for k in adapter.weights})
    with pytest.raises(AdapterError, match="do not fit base"):
        wrong.check_fits(tiny_base)


def test_blob_bad_inputs(tiny_base, adapter):
    data = to_bytes(adapter)
    with pytest.raises(AdapterError, match="truncated or malformed"):
        from_bytes(data[:-10])
    with pytest.raises(AdapterError, match="over the limit"):
        from_bytes(data, max_bytes=100)
    from safetensors.torch import save

    with pytest.raises(AdapterError, match="not written by lorafleet"):
        from_bytes(save({"base_model.model.x.lora_A.weight": torch.zeros(4, 3)}))
