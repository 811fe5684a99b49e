"""Batch generation through transformers' ``generate`` with a different adapter per row.

A simple, correct path (each row its own adapter via the operator, padded batch, KV cache); the
continuous-batching engine is the fast path for serving.
"""

from __future__ import annotations

import torch

from lorafleet.adapters import LoraAdapter, LoraHost
from lorafleet.adapters.stack import AdapterStack, route_rows
from lorafleet.serving.chat import chat_prompt_ids


@torch.no_grad()
def generate(
    base,
    prompts: list,
    adapters: list[LoraAdapter | AdapterStack | None] | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = True,
) -> list[str]:
    """Generate one completion per prompt; ``adapters[i]`` (an adapter, a stack, or None = base) applies to row
    ``i``."""
    tok = base.tokenizer
    adapters = adapters or [None] * len(prompts)
    if len(adapters) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(adapters)} adapters")
    rows = [chat_prompt_ids(tok, p) if chat else tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    table, slots = route_rows(adapters)
    host = LoraHost.attach(base.model)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    with host.route(table, slots):
        out = base.model.generate(
            input_ids=ids.to(base.device),
            attention_mask=mask.to(base.device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
            **sampling,
        )
    return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]
