"""OpenAI ``logprobs`` / ``top_logprobs`` for a finished completion.

The serving engine does not keep per-token distributions; like the Tinker sampler's log-probs
(:meth:`lorafleet.api.tinker.core.TinkerService._sampled_logprobs`), they are computed after generation by one
forward pass of prompt + completion through the same base and adapter stack (routing is thread-local, so this
runs beside the engine). They are the model's log-probabilities at temperature 1, before ``top_p`` — what
OpenAI reports — for the tokens whose text the response returns (tokens past a stop string are not listed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _adapter_item(svc, digests: tuple[str, ...]):
    from lorafleet.adapters import from_bytes  # noqa: PLC0415 - defers torch
    from lorafleet.adapters.stack import AdapterStack  # noqa: PLC0415 - defers torch

    levels = tuple(from_bytes(svc.registry.read_blob(d), svc.base) for d in digests)
    if not levels:
        return None
    return levels[0] if len(levels) == 1 else AdapterStack(levels)


def returned_tokens(tokenizer, token_ids: list[int], text: str) -> list[int]:
    """The shortest prefix of ``token_ids`` whose text covers ``text`` (drops a stop string's tokens and EOS)."""
    if not text:
        return []
    for k in range(1, len(token_ids) + 1):
        if len(tokenizer.decode(token_ids[:k], skip_special_tokens=True)) >= len(text):
            return token_ids[:k]
    return list(token_ids)


@torch.no_grad()
def token_logprobs(svc, digests: tuple[str, ...], prompt: list[int], completion: list[int],
                   top: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """``[(token, logprob, [(alt_token, alt_logprob)] * top)]`` for each completion token."""
    from lorafleet.adapters import LoraHost  # noqa: PLC0415 - defers torch
    from lorafleet.adapters.stack import route_rows  # noqa: PLC0415 - defers torch

    if not completion:
        return []
    base = svc.base
    table, slots = route_rows([_adapter_item(svc, digests)])
    ids = torch.tensor([prompt + completion[:-1]], device=base.device)  # (1, T)
    host = LoraHost.attach(base.model)
    with host.route(table, slots):
        logits = base.model(input_ids=ids).logits[0, len(prompt) - 1:].float()  # (C, V)
    logp = F.log_softmax(logits, dim=-1)  # (C, V)
    chosen = logp.gather(1, torch.tensor(completion, device=logp.device)[:, None])[:, 0].tolist()  # (C,)
    alts = logp.topk(top, dim=-1) if top > 0 else None
    out = []
    for i, (tok, lp) in enumerate(zip(completion, chosen, strict=True)):
        pairs = list(zip(alts.indices[i].tolist(), alts.values[i].tolist(), strict=True)) if alts is not None else []
        out.append((tok, lp, pairs))
    return out


def _piece(tokenizer, tok: int) -> str:
    return tokenizer.decode([tok])


def chat_logprobs(svc, entries) -> dict:
    """The ``choices[i].logprobs`` object of a chat completion."""
    tok = svc.base.tokenizer

    def item(t: int, lp: float) -> dict:
        s = _piece(tok, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in alts]} for t, lp, alts in entries],
            "refusal": None}


def completion_logprobs(svc, entries) -> dict:
    """The legacy ``choices[i].logprobs`` object of a text completion."""
    tok = svc.base.tokenizer
    tokens, offsets, pos = [], [], 0
    for t, _, _ in entries:
        s = _piece(tok, t)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{_piece(tok, a): alp for a, alp in alts} for _, _, alts in entries],
            "text_offset": offsets}
