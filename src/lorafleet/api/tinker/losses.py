"""Tinker's built-in losses over per-token log-probs (sums over tokens, as the Tinker docs define them).

``logp`` are the trained model's log-probs of the target tokens, ``q`` the sampler's (``loss_fn_inputs["logprobs"]``),
``A`` the advantages, ``r = exp(logp - q)`` the importance ratio; every loss is elementwise, then summed:

- ``cross_entropy``: ``-(weights * logp)``.
- ``importance_sampling`` (REINFORCE with an importance ratio): ``-(r * A)``.
- ``ppo``: ``-min(r * A, clip(r, low, high) * A)``; ``loss_fn_config`` ``clip_low_threshold`` (0.8),
  ``clip_high_threshold`` (1.2) — Tinker's fixed epsilon 0.2 as the default.
- ``cispo``: ``-(sg(clip(r, low, high)) * logp * A)`` (the clipped ratio is a detached coefficient);
  ``clip_low_threshold`` (0.0), ``clip_high_threshold`` (4.0), Tinker's one-sided default.
- ``dro``: ``-(logp * A - beta / 2 * (logp - q) ** 2)``; ``loss_fn_config`` ``beta`` is required (>= 0).

:func:`loss_config` checks a request's ``loss_fn_config`` for its loss (unknown keys, text values, non-finite or
out-of-range numbers, thresholds out of order are refused, naming the key) and fills in the defaults.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lorafleet.api.tinker.state import TinkerUserError

_RL_INPUTS = ("target_tokens", "logprobs", "advantages")

# loss_fn -> the loss_fn_inputs it needs besides the tokens (all of the datum's length)
LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": _RL_INPUTS,
    "ppo": _RL_INPUTS,
    "cispo": _RL_INPUTS,
    "dro": _RL_INPUTS,
}

# loss_fn -> its loss_fn_config keys and defaults (None: required)
LOSS_CONFIG: dict[str, dict[str, float | None]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": None},
}


def check_loss_fn(loss_fn: str) -> None:
    if loss_fn not in LOSS_INPUTS:
        raise TinkerUserError(f"loss_fn {loss_fn!r} is not supported by lorafleet; supported: {sorted(LOSS_INPUTS)}")


def loss_config(loss_fn: str, config: dict | None) -> dict[str, float]:
    """``config`` checked against ``loss_fn``'s keys, with its defaults filled in (a TinkerUserError otherwise)."""
    check_loss_fn(loss_fn)
    allowed, config = LOSS_CONFIG[loss_fn], dict(config or {})
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        takes = f"takes {sorted(allowed)}" if allowed else "takes no loss_fn_config"
        raise TinkerUserError(f"loss_fn_config {unknown} not understood: loss_fn {loss_fn!r} {takes}")
    out: dict[str, float] = {}
    for name, default in allowed.items():
        value = config.get(name, default)
        if value is None:
            raise TinkerUserError(f"loss_fn {loss_fn!r} needs loss_fn_config[{name!r}] (a number >= 0)")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise TinkerUserError(f"loss_fn_config[{name!r}] must be a finite number >= 0, got {value!r}")
        out[name] = float(value)
    if "clip_low_threshold" in out and out["clip_low_threshold"] > out["clip_high_threshold"]:
        raise TinkerUserError(f"loss_fn_config: clip_low_threshold {out['clip_low_threshold']} is above "
                              f"clip_high_threshold {out['clip_high_threshold']}")
    return out


def elementwise_loss(loss_fn: str, logp: Tensor, inputs: dict[str, Tensor], config: dict[str, float] | None = None
                     ) -> Tensor:
    """Per-token loss ``(T,)`` of one datum from its target log-probs ``logp: (T,)``; ``config`` from
    :func:`loss_config` (the defaults when None; ``dro`` has none for ``beta``)."""
    cfg = loss_config(loss_fn, None) if config is None else config
    if loss_fn == "cross_entropy":
        return -logp * inputs["weights"]
    adv = inputs["advantages"]
    if loss_fn == "dro":
        return -(logp * adv - 0.5 * cfg["beta"] * (logp - inputs["logprobs"]) ** 2)
    ratio = torch.exp(logp - inputs["logprobs"])  # (T,)
    if loss_fn == "importance_sampling":
        return -ratio * adv
    clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    if loss_fn == "ppo":
        return -torch.minimum(ratio * adv, clipped * adv)
    if loss_fn == "cispo":
        return -(clipped.detach() * logp * adv)
    raise TinkerUserError(f"unknown loss_fn {loss_fn!r}")  # check_loss_fn refuses names before this point


def token_weight(loss_fn: str, inputs: dict[str, Tensor]) -> float:
    """How many target tokens a datum contributes to the reported mean loss."""
    if loss_fn == "cross_entropy":
        return float(inputs["weights"].sum())
    return float((inputs["advantages"] != 0).sum())
