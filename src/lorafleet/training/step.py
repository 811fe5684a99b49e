"""One packed multi-user step over the shared base: the trainer and the Tinker service both step through here.

Rows of several users are padded into one batch and go through one forward over the resident base, row ``b``
through its owner's adapter (or stack of frozen parents + adapter) via the shared operator; the caller turns the
rows' log-probs into each user's loss, and :func:`backward_sum` takes one backward over their sum. A user's
parameters only touch that user's rows, so each adapter receives exactly the gradient of its own loss — the
same update as a step taken alone.

- :class:`~lorafleet.training.trainer.MultiTenantTrainer`: SFT (per-row labelled log-probs, :func:`labelled_logprobs`)
  and DPO (a policy pass, and a reference pass through the frozen parents only), one optimizer step per user.
- ``api/tinker/core.py``: each forward_backward op's datums (per-token :func:`~lorafleet.training.losses.next_token_logprobs`, Tinker's
  cross_entropy / importance_sampling), micro-batched by padded tokens; gradients accumulate until optim_step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from lorafleet.adapters import LoraAdapter, LoraHost
from lorafleet.adapters.stack import AdapterStack, route_rows
from lorafleet.training.data import IGNORE
from lorafleet.training.losses import labelled_logprobs

__all__ = ["backward_sum", "pad_rows", "packed_forward"]


def pad_rows(rows: Sequence[Sequence[int]], labels: Sequence, pad_id: int,
             label_pad: int = IGNORE) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``(ids, labels, mask)``, each ``(B, T)`` long: ``ids`` padded with ``pad_id``, ``labels``
    (token lists or tensors, at most each row's length) with ``label_pad``, ``mask`` 1 on each row's tokens."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), label_pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.as_tensor(r)
        lab[i, : len(lb)] = torch.as_tensor(lb)
        mask[i, : len(r)] = 1
    return ids, lab, mask


def packed_forward(base, users: Sequence[LoraAdapter | AdapterStack | None], owners: Sequence[int],
                   rows: Sequence[Sequence[int]], labels: Sequence, *,
                   score: Callable[..., Tensor | tuple[Tensor, Tensor]] = labelled_logprobs,
                   pad_id: int | None = None, label_pad: int = IGNORE, grad: bool | None = None,
                   train: bool = True):
    """One forward over the shared base for rows of several users; returns ``score(model, ids, mask, labels)``.

    ``users``: what each user's rows are routed through (an adapter, a stack, or None for the base alone), in
    slot order: each distinct adapter is one slot of the pass's table (by identity; parents shared by several
    users are one slot). ``owners[b]``: the user of row ``b``. ``score``: :func:`labelled_logprobs` (per-row
    summed log-prob and label count, ``labels`` shifted with :data:`IGNORE`) or :func:`~lorafleet.training.losses.next_token_logprobs`
    (per-token, ``labels`` = the aligned targets). ``pad_id``: default the tokenizer's pad token. ``grad``: None
    keeps the caller's grad mode. ``train``: the table applies adapter dropout (a training-time regulariser).
    The base itself stays in eval mode (no base dropout): only adapter tensors learn.
    """
    base.model.train(False)
    table, user_slots = route_rows(users, train=train)
    slots = None if table is None else [user_slots[k] for k in owners]
    ids, lab, mask = pad_rows(rows, labels, base.tokenizer.pad_token_id if pad_id is None else pad_id, label_pad)
    device = base.device
    mode = contextlib.nullcontext() if grad is None else torch.set_grad_enabled(grad)
    with mode, LoraHost.attach(base.model).route(table, slots):
        return score(base.model, ids.to(device), mask.to(device), lab.to(device))


def backward_sum(losses: Iterable[Tensor]) -> bool:
    """One backward over the sum of the users' losses (each adapter gets its own loss's gradient); False if none."""
    terms = list(losses)
    if not terms:
        return False
    torch.stack(terms).sum().backward()
    return True
