"""Losses over per-row token log-probabilities: SFT (cross-entropy on labelled tokens) and DPO.

DPO (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290) needs a reference model; ours is the same
base with the row's adapter switched off (slot -1), so no second copy of the base is held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafleet.training.data import IGNORE


def shifted_token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-prob of each next token: ``logits: (B, T, V)``, ``labels: (B, T)`` -> ``(B, T-1)`` and its mask."""
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    target = labels[:, 1:]  # (B, T-1)
    mask = target != IGNORE
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def sft_token_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row summed negative log-likelihood and per-row labelled-token count: ``(B,)``, ``(B,)``."""
    logp, mask = shifted_token_logprobs(logits, labels)
    return -logp.sum(dim=1), mask.sum(dim=1)


def sequence_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed log-prob of the labelled tokens of each row: ``(B,)``."""
    logp, _ = shifted_token_logprobs(logits, labels)
    return logp.sum(dim=1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1) -> Tensor:
    """Per-pair DPO loss ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``: ``(N,)``."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)
