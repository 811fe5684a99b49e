"""Tinker's built-in losses over per-token log-probs (sums over tokens, as the Tinker docs define them).

``cross_entropy``: ``-(weights * logp).sum()``. ``importance_sampling`` (REINFORCE with an importance ratio
against the sampler's log-probs): ``-(exp(logp - sampler_logp) * advantages).sum()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# loss_fn -> the loss_fn_inputs it needs besides the tokens (all of the datum's length)
LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
}


def elementwise_loss(loss_fn: str, logp: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    """Per-token loss ``(T,)`` of one datum from its target log-probs ``logp: (T,)``."""
    if loss_fn == "cross_entropy":
        return -logp * inputs["weights"]
    if loss_fn == "importance_sampling":
        ratio = torch.exp(logp - inputs["logprobs"])  # (T,)
        return -ratio * inputs["advantages"]
    raise ValueError(f"unknown loss_fn {loss_fn!r}")  # the routes check names before this point


def token_weight(loss_fn: str, inputs: dict[str, Tensor]) -> float:
    """How many target tokens a datum contributes to the reported mean loss."""
    if loss_fn == "cross_entropy":
        return float(inputs["weights"].sum())
    return float((inputs["advantages"] != 0).sum())
