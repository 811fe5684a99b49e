"""Losses over per-row token log-probabilities: SFT (cross-entropy on labelled tokens) and DPO.

DPO (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290) needs a reference model; ours is the same
base with the row's adapter switched off (slot -1), so no second copy of the base is held.

The vocabulary projection is the largest tensor of a step (SmolLM2: 49152 float32 logits per scored token,
200 KB each), so :func:`head_logprobs` runs it over chunks of :data:`LOSS_CHUNK_TOKENS` tokens and, with
gradients on, keeps no chunk's logits for the backward (each chunk is recomputed there, one at a time): the
full ``(tokens, vocab)`` logits never exist. Same values and gradients as the unchunked projection (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lorafleet.training.data import IGNORE

# Scored tokens per chunk of the vocabulary projection: 256 x 49152 float32 logits = 50 MB live at a time
# (x ~3 in the backward's recompute: logits, their softmax, their gradient).
LOSS_CHUNK_TOKENS = 256


def head_logprobs(model, hidden: Tensor, targets: Tensor, chunk: int = LOSS_CHUNK_TOKENS) -> Tensor:
    """``log p(targets[i] | hidden[i])`` through the model's output head: ``hidden (N, H)``, ``targets (N,)`` -> ``(N,)``.

    The head runs over ``chunk`` tokens at a time; with gradients on, each chunk is checkpointed (its logits are
    recomputed in the backward instead of kept), so at most one chunk's logits are alive. A Gemma-style
    ``final_logit_softcapping`` is applied as the model's own forward applies it.
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"loss chunk must be a positive number of tokens, got {chunk!r}")
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def piece(h: Tensor, t: Tensor) -> Tensor:
        logits = head(h).float()  # (n, V): the only place a chunk's logits exist
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.gather(1, t.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)  # (n,)

    grad = torch.is_grad_enabled()
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        parts.append(checkpoint(piece, h, t, use_reentrant=False) if grad else piece(h, t))
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def shifted_token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-prob of each next token: ``logits: (B, T, V)``, ``labels: (B, T)`` -> ``(B, T-1)`` and its mask."""
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    target = labels[:, 1:]  # (B, T-1)
    mask = target != IGNORE
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def labelled_logprobs(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row summed log-prob of the labelled next tokens, and per-row label counts: ``(B,)``, ``(B,)``.

    Same value as ``shifted_token_logprobs(model(...).logits, labels)`` summed per row, but the vocabulary
    projection (a fifth of SmolLM2's training FLOPs) runs only at positions that carry a label — in SFT the
    assistant tokens — instead of at every position, in chunks (:func:`head_logprobs`).
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None:  # an architecture without the split: the plain path
        logp, mask = shifted_token_logprobs(model(input_ids=input_ids, attention_mask=attention_mask,
                                                  use_cache=False).logits, labels)
        return logp.sum(dim=1), mask.sum(dim=1)
    # use_cache=False: a training pass needs no KV cache (and a checkpointed layer must not append to one twice)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, H)
    target = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    rows, cols = (target != IGNORE).nonzero(as_tuple=True)  # (N,), (N,)
    logp = head_logprobs(model, hidden[rows, cols], target[rows, cols])  # (N,), in chunks
    sums = logp.new_zeros(input_ids.shape[0]).index_add(0, rows, logp)
    counts = torch.bincount(rows, minlength=input_ids.shape[0])
    return sums, counts


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


def next_token_logprobs(model, input_ids: Tensor, attention_mask: Tensor, targets: Tensor) -> Tensor:
    """Log-prob of ``targets[b, t]`` as the token after position ``t`` (no shift: the caller aligned them).

    ``input_ids, attention_mask, targets: (B, T)`` -> ``(B, T)``; positions outside the mask are 0. This is
    the Tinker convention (``model_input`` = tokens[:-1], ``target_tokens`` = tokens[1:]); the vocabulary
    projection runs only on unmasked positions, in chunks, as in :func:`labelled_logprobs`.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    rows, cols = attention_mask.nonzero(as_tuple=True)  # (N,), (N,)
    if decoder is None or head is None:  # an architecture without the split: the plain path
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).logits[rows, cols].float()  # (N, V)
        logp = torch.gather(F.log_softmax(logits, dim=-1), 1, targets[rows, cols].unsqueeze(1)).squeeze(1)  # (N,)
    else:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logp = head_logprobs(model, hidden[rows, cols], targets[rows, cols])  # (N,), in chunks
    out = logp.new_zeros(input_ids.shape)  # (B, T)
    return out.index_put((rows, cols), logp)
