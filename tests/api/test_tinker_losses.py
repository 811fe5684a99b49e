"""Tinker's RL losses (ppo, cispo, dro) on the tiny model: each loss's value and its gradient against a hand
computation of the Tinker docs' formulas, and the config checks (unknown key, missing beta, bad numbers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafleet.adapters import LoraAdapter, LoraSpec
from lorafleet.api.tinker import losses
from lorafleet.api.tinker.state import TinkerUserError
from lorafleet.base import load_base
from lorafleet.training.losses import next_token_logprobs
from lorafleet.training.step import packed_forward

# log(r) per token: ratios below, inside and above the clip ranges, with advantages of both signs
DELTA = np.array([-0.9, -0.3, -0.05, 0.0, 0.05, 0.3, 0.9, 1.8, -1.8, 0.15], dtype=np.float32)
ADV = np.array([1.0, -1.0, 0.5, 2.0, -0.5, 1.5, -2.0, 1.0, -1.0, 0.0], dtype=np.float32)


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


def _logp(tiny, seed=3):
    """Per-token log-probs ``(T,)`` of a fixed row under a random adapter (trainable), and the adapter."""
    adapter = LoraAdapter.create(tiny, LoraSpec(rank=4, alpha=8), seed=seed, init="random")
    for n, (A, B) in list(adapter.weights.items()):
        adapter.weights[n] = (A.requires_grad_(True), B.requires_grad_(True))
    g = torch.Generator().manual_seed(seed)
    row = torch.randint(3, 200, (len(DELTA) + 1,), generator=g).tolist()
    logp = packed_forward(tiny, [adapter], [0], [row[:-1]], [row[1:]], score=next_token_logprobs, pad_id=0,
                          label_pad=0, grad=True, train=False)[0]
    return logp, adapter


def _hand(loss_fn, lp, q, adv, cfg):
    """(elementwise loss, d loss / d logp) from the Tinker docs' formulas, in numpy."""
    lp, q, adv = (np.asarray(x, dtype=np.float64) for x in (lp, q, adv))
    r = np.exp(lp - q)
    if loss_fn == "dro":
        return -(lp * adv - 0.5 * cfg["beta"] * (lp - q) ** 2), -adv + cfg["beta"] * (lp - q)
    lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
    clipped = np.clip(r, lo, hi)
    if loss_fn == "cispo":
        return -clipped * lp * adv, -clipped * adv
    # ppo: -min(r A, clip(r) A); the unclipped term's gradient -r A flows where it is the minimum or the ratio is
    # inside the clip range (then both terms are the same), the clipped term has none outside it
    unclipped, clip_obj = r * adv, clipped * adv
    live = (unclipped <= clip_obj) | ((r >= lo) & (r <= hi))
    return -np.minimum(unclipped, clip_obj), np.where(live, -r * adv, 0.0)


@pytest.mark.parametrize(("loss_fn", "config"), [
    ("ppo", {}), ("ppo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}),
    ("cispo", {}), ("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("dro", {"beta": 0.5}), ("dro", {"beta": 0.0})])
def test_rl_loss_value_and_gradient_match_the_hand_computation(tiny, loss_fn, config):
    cfg = losses.loss_config(loss_fn, config)
    logp, adapter = _logp(tiny)
    q = (logp.detach() - torch.from_numpy(DELTA))  # sampler log-probs: r = exp(DELTA)
    inputs = {"logprobs": q, "advantages": torch.from_numpy(ADV)}
    loss = losses.elementwise_loss(loss_fn, logp, inputs, cfg)
    want, dwant = _hand(loss_fn, logp.detach().numpy(), q.numpy(), ADV, cfg)
    np.testing.assert_allclose(loss.detach().numpy(), want, rtol=1e-5, atol=1e-6)
    (dlogp,) = torch.autograd.grad(loss.sum(), logp, retain_graph=True)
    np.testing.assert_allclose(dlogp.numpy(), dwant, rtol=1e-5, atol=1e-6)
    if loss_fn == "ppo" and not config:  # the defaults clip: some tokens get no gradient, others do
        assert (dwant == 0).any() and (dwant != 0).any()
    # ...and through the model: the adapter's gradient is the chain rule of the hand derivative.
    loss.sum().backward(retain_graph=True)
    got = [t.grad.clone() for ab in adapter.weights.values() for t in ab]
    for ab in adapter.weights.values():
        for t in ab:
            t.grad = None
    (torch.from_numpy(dwant.astype(np.float32)) * logp).sum().backward()
    for a, b in zip(got, (t.grad for ab in adapter.weights.values() for t in ab), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in got)


def test_defaults_are_tinkers():
    assert losses.loss_config("ppo", None) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert losses.loss_config("cispo", {}) == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    assert losses.loss_config("cross_entropy", None) == {}


@pytest.mark.parametrize(("loss_fn", "config", "message"), [
    ("gspo", {}, r"loss_fn 'gspo' is not supported by lorafleet; supported: \['cispo', 'cross_entropy', 'dro'"),
    ("dro", {}, r"loss_fn 'dro' needs loss_fn_config\['beta'\]"),
    ("ppo", {"clip_ratio": 0.2}, r"loss_fn_config \['clip_ratio'\] not understood: loss_fn 'ppo' takes "
                                 r"\['clip_high_threshold', 'clip_low_threshold'\]"),
    ("cross_entropy", {"beta": 1.0}, r"loss_fn 'cross_entropy' takes no loss_fn_config"),
    ("ppo", {"clip_low_threshold": 1.3}, "clip_low_threshold 1.3 is above clip_high_threshold 1.2"),
    ("cispo", {"clip_high_threshold": "high"}, r"loss_fn_config\['clip_high_threshold'\] must be a finite number"),
    ("dro", {"beta": float("nan")}, r"loss_fn_config\['beta'\] must be a finite number >= 0"),
    ("dro", {"beta": -1.0}, r"loss_fn_config\['beta'\] must be a finite number >= 0"),
])
def test_bad_loss_or_config_is_named(loss_fn, config, message):
    with pytest.raises(TinkerUserError, match=message):
        losses.loss_config(loss_fn, config)
