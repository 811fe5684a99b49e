"""VeRA: peft-identical projections and outputs, expansion to LoRA, blobs with codecs, training, refused input."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from lorafleet.adapters import (
    AdapterError,
    LoraAdapter,
    LoraHost,
    LoraSpec,
    StackedWeights,
    VeraAdapter,
    VeraSpec,
    decode_blob,
    from_bytes,
    save_peft,
    to_bytes,
)
from lorafleet.adapters.vera import projections
from lorafleet.evaluation.personas import get_persona
from lorafleet.training.trainer import MultiTenantTrainer, TrainConfig, sft_eval_loss


def trained_like(base, targets="all", seed=0, rank=4) -> VeraAdapter:
    """A VeRA adapter with non-trivial vectors (b = 0 would be the base itself)."""
    v = VeraAdapter.create(base, VeraSpec(rank=rank, target_modules=targets, projection_seed=7))
    g = torch.Generator().manual_seed(seed)
    v.weights = {n: (d + torch.randn(d.shape, generator=g), torch.randn(b.shape, generator=g) * 0.5)
                 for n, (d, b) in v.weights.items()}
    return v


def test_outputs_equal_peft_vera(tiny_base, plain_tiny_model, tmp_path):
    v = trained_like(tiny_base)
    save_peft(v, tmp_path)
    model = PeftModel.from_pretrained(copy.deepcopy(plain_tiny_model), tmp_path).eval()
    ids = torch.randint(0, 250, (3, 9), generator=torch.Generator().manual_seed(1))
    host = LoraHost.attach(tiny_base.model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with host.route(StackedWeights([v.to_lora()]), [0, 0, 0]):
            got = tiny_base.model(input_ids=ids).logits
        plain = tiny_base.model(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-5
    assert (plain - want).abs().max() > 1e-3  # the adapter changes the output, so the comparison can fail
    # the shared projections are peft's, regenerated from the key
    layer = next(m for m in model.modules() if hasattr(m, "vera_A"))
    A0, B0 = projections(7, 4, *v.in_out_max)
    assert torch.equal(layer.vera_A["default"], A0) and torch.equal(layer.vera_B["default"], B0)


def test_expansion_is_diag_b_B0_diag_d_A0(tiny_base):
    v = trained_like(tiny_base, targets="mlp")
    lora = v.to_lora()
    A0, B0 = projections(7, 4, *v.in_out_max)
    for name, (d, b) in v.weights.items():
        n_in, n_out = v.dims[name.rsplit(".", 1)[-1]]
        want = torch.diag(b) @ B0[:n_out] @ torch.diag(d) @ A0[:, :n_in]
        assert torch.allclose(lora.delta_weight(name), want, atol=1e-6)
    assert lora.spec.scaling == 1.0 and lora.spec.rank == 4


@pytest.mark.parametrize("codec", [None, "fp32", "fp16", "int8", "q4"])
def test_blob_round_trip_stores_only_the_vectors(tiny_base, codec):
    v = trained_like(tiny_base, targets="attention")
    blob = to_bytes(v, codec)
    stored = decode_blob(blob, tiny_base)
    assert isinstance(stored, VeraAdapter) and stored.spec == v.spec and stored.dims == v.dims
    tol = {None: 0, "fp32": 0, "fp16": 2e-3, "int8": 2e-2, "q4": 0.2}[codec]
    for name, pair in v.weights.items():
        for want, got in zip(pair, stored.weights[name], strict=True):  # d, then b
            assert (got - want).abs().max() <= tol * want.abs().max() + 1e-7
    served = from_bytes(blob, tiny_base)  # what the engine loads: the equivalent LoRA
    assert isinstance(served, LoraAdapter) and set(served.weights) == set(v.weights)
    lora_blob = len(to_bytes(LoraAdapter.create(tiny_base, LoraSpec(rank=1, target_modules="attention"))))
    if codec is not None:
        assert len(blob) < lora_blob  # smaller than rank-1 LoRA on the same targets


def test_trained_in_the_same_step_as_lora_users(tiny_base):
    """The trainer packs VeRA and LoRA users; VeRA's d and b get gradients through the expansion."""
    data = get_persona("ahab").data().train_dataset()
    cfg = TrainConfig(steps=3, lr=5e-2, batch_size=2, max_len=64)
    packed = MultiTenantTrainer(tiny_base)
    packed.add("vera", trained_like(tiny_base, "attention"), data, cfg)
    packed.add("lora", LoraAdapter.create(tiny_base, LoraSpec(rank=2, target_modules="all")), data, cfg)
    alone = MultiTenantTrainer(tiny_base)
    alone.add("vera", trained_like(tiny_base, "attention"), data, cfg)
    for _ in range(3):
        packed.step()
        alone.step()
    start = trained_like(tiny_base, "attention")
    for name, (d, b) in packed.users["vera"].adapter.weights.items():
        d1, b1 = alone.users["vera"].adapter.weights[name]
        assert torch.allclose(d, d1, atol=1e-5) and torch.allclose(b, b1, atol=1e-5)  # packed == alone
        assert not torch.allclose(b, start.weights[name][1])  # it learned
    before = sft_eval_loss(tiny_base, start, data, 64)
    assert packed.eval_loss("vera", data) < before  # on the whole training set, it got better


ERROR_CASES = [
    ({"rank": 0}, "rank must be an integer"),
    ({"rank": 65}, "rank must be an integer"),
    ({"projection_seed": -1}, "projection_seed"),
    ({"d_initial": float("nan")}, "d_initial"),
    ({"target_modules": "lm_head"}, "unknown target module"),
]


@pytest.mark.parametrize(("kwargs", "match"), ERROR_CASES)
def test_spec_errors(kwargs, match):
    with pytest.raises(AdapterError, match=match):
        VeraSpec(**kwargs)


def test_bad_vera_blobs_are_refused(tiny_base):
    v = trained_like(tiny_base, targets="attention")
    name = next(iter(v.weights))
    short = VeraAdapter(v.spec, {**v.weights, name: (v.weights[name][0][:-1], v.weights[name][1])}, v.dims)
    with pytest.raises(AdapterError, match="do not fit rank"):
        to_bytes(short)
    other = VeraAdapter(v.spec, v.weights, {**v.dims, "q_proj": (v.dims["q_proj"][0] + 1, v.dims["q_proj"][1])})
    with pytest.raises(AdapterError, match="was made for in/out"):
        from_bytes(to_bytes(other), tiny_base)
    nan = VeraAdapter(v.spec, {**v.weights, name: (v.weights[name][0], v.weights[name][1] * float("nan"))}, v.dims)
    with pytest.raises(AdapterError, match="NaN or Inf"):
        from_bytes(to_bytes(nan, "fp16"))
