"""Greedy generation for evaluation, behind one small function so the backend can be swapped.

The default backend is :func:`lorafleet.serving.hf_generate.generate` (transformers' ``generate`` with a
different adapter per row). A faster engine plugs in with :func:`set_backend`; it must accept
``(base, prompts, adapters, max_new_tokens)`` and return one greedy completion per row. A text prompt is a user
message: backends receive every prompt as a list of chat messages. ``adapters[i]`` is a
``LoraAdapter``, an ``AdapterStack`` (a stacked adapter evaluated as it is served) or None.
"""

from __future__ import annotations

from collections.abc import Callable

Backend = Callable[..., list[str]]
_backend: Backend | None = None


def set_backend(fn: Backend | None) -> None:
    """Use ``fn`` for evaluation's generation (None restores the default)."""
    global _backend
    _backend = fn


def _default_backend(base, prompts: list, adapters: list, max_new_tokens: int) -> list[str]:
    from lorafleet.serving.hf_generate import generate  # noqa: PLC0415 - torch/transformers import

    return generate(base, prompts, adapters, max_new_tokens=max_new_tokens, temperature=0.0)


def generate_responses(base, prompts: list, adapters: list, *, max_new_tokens: int = 48, batch_size: int = 16,
                       on_batch: Callable[[int], None] | None = None) -> list[str]:
    """One greedy completion per ``prompts[i]`` under ``adapters[i]`` (None = the base alone).

    Rows are batched adapter rows first, base rows last: a trained adapter usually stops early, while the base
    tends to run to ``max_new_tokens``, and a batch lasts as long as its longest row.
    """
    if len(prompts) != len(adapters):
        raise ValueError(f"got {len(prompts)} prompts but {len(adapters)} adapters")
    backend = _backend or _default_backend
    order = sorted(range(len(prompts)), key=lambda i: adapters[i] is None)
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        # A text prompt is one user message (the engine would otherwise take text as a raw continuation).
        chats = [[{"role": "user", "content": prompts[i]}] if isinstance(prompts[i], str) else prompts[i] for i in rows]
        texts = backend(base, chats, [adapters[i] for i in rows], max_new_tokens)
        for i, text in zip(rows, texts, strict=True):
            out[i] = text
        if on_batch is not None:
            on_batch(len(rows))
    return out
