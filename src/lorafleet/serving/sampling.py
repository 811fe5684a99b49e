"""Choosing the next token of every row: greedy, or temperature + top-p sampling with a per-request generator.

Each sampling row draws one uniform number per token from its own ``torch.Generator`` (seeded by the request)
and picks the token by inverse CDF, vectorized over the rows. A row's draw therefore depends only on its own
seed and logits, never on which other requests share the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def request_generator(seed: int) -> torch.Generator:
    """The request's own generator (on the CPU, so results do not depend on the device)."""
    return torch.Generator().manual_seed(seed)


def sample_rows(logits: Tensor, temperature: list[float], top_p: list[float],
                generators: list[torch.Generator | None]) -> Tensor:
    """Next token of each row of ``logits (n, V)``; ``temperature[i] == 0`` means greedy. Returns ``(n,)`` long."""
    n = logits.shape[0]
    sampled = [i for i in range(n) if temperature[i] > 0.0]
    if not sampled:
        return logits.argmax(dim=-1)
    tokens = logits.argmax(dim=-1) if len(sampled) < n else None
    rows = torch.tensor(sampled, device=logits.device) if tokens is not None else None
    sub = logits if rows is None else logits.index_select(0, rows)  # (m, V)
    temps = torch.tensor([temperature[i] for i in sampled], dtype=torch.float32, device=logits.device)
    probs = torch.softmax(sub.float() / temps[:, None], dim=-1)  # (m, V)
    # One uniform draw per row from its own generator: the only randomness, independent of batch mates.
    u = torch.tensor([float(torch.rand((), generator=generators[i])) for i in sampled],
                     dtype=torch.float32, device=logits.device)  # (m,)
    nucleus = [top_p[i] for i in sampled]
    if all(p >= 1.0 for p in nucleus):
        order = None
        cdf = probs.cumsum(dim=-1)  # (m, V)
    else:
        probs, order = probs.sort(dim=-1, descending=True)
        cum = probs.cumsum(dim=-1)
        tp = torch.tensor(nucleus, dtype=torch.float32, device=logits.device)
        probs = probs * ((cum - probs) < tp[:, None])  # keep the smallest prefix reaching top_p (>= 1 token)
        cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1])[:, None]  # (m, 1)
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)  # (m, 1)
    chosen = (pick if order is None else order.gather(1, pick)).squeeze(1)
    if tokens is None:
        return chosen
    return tokens.index_copy(0, rows, chosen)
