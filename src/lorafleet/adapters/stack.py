"""Adapter stacks: several adapters applied to the same row, their deltas summed by the operator.

A stack is ordered root first (organisation, team, person). The operator takes ``slots: (Bsz, L)`` — one slot
per level, ``-1`` for none — and adds every level's delta (see :mod:`lorafleet.adapters.operator`), so rows with
different stacks, single adapters and no adapter share one forward. :func:`route_rows` turns per-row items
(an adapter, a stack, or None) into that slot matrix over one table of unique adapters, for every caller that
builds a :class:`StackedWeights` (training, evaluation, generation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.adapters.errors import AdapterError
from lorafleet.adapters.slots import StackedWeights
from lorafleet.adapters.weights import LoraAdapter
from lorafleet.limits import MAX_LEVELS  # the registry's stacks obey the same limit


@dataclass(frozen=True)
class AdapterStack:
    """Adapters applied together, root first; the delta of the stack is the sum of the levels' deltas."""

    levels: tuple[LoraAdapter, ...]

    def __post_init__(self) -> None:
        levels = tuple(self.levels)
        if not 1 <= len(levels) <= MAX_LEVELS or not all(isinstance(a, LoraAdapter) for a in levels):
            raise AdapterError(f"an adapter stack holds 1..{MAX_LEVELS} LoraAdapter levels, got {self.levels!r}")
        object.__setattr__(self, "levels", levels)

    @property
    def top(self) -> LoraAdapter:
        return self.levels[-1]

    @property
    def num_bytes(self) -> int:
        return sum(a.num_bytes for a in self.levels)

    def delta_weight(self, name: str) -> torch.Tensor:
        """Sum over levels of ``scaling * B @ A`` for one module, ``(out, in)`` (zero where no level touches it)."""
        parts = [a.delta_weight(name) for a in self.levels if name in a.weights]
        if not parts:
            raise KeyError(name)
        return torch.stack(parts).sum(0)

    def modules(self) -> list[str]:
        return sorted(set().union(*(a.weights for a in self.levels)))


def levels_of(item: LoraAdapter | AdapterStack | None) -> tuple[LoraAdapter, ...]:
    if item is None:
        return ()
    if isinstance(item, AdapterStack):
        return item.levels
    if isinstance(item, LoraAdapter):
        return (item,)
    raise AdapterError(f"expected a LoraAdapter, an AdapterStack or None, got {type(item).__name__}")


def route_rows(items: Sequence[LoraAdapter | AdapterStack | None], *,
               train: bool = False) -> tuple[StackedWeights | None, list[list[int]] | None]:
    """``(table, slots)`` for rows whose adapters are ``items``: ``slots[b]`` lists row ``b``'s slot per level
    (padded with -1 to the deepest row), ``table`` holds each distinct adapter once (by identity). ``(None,
    None)`` when no row has an adapter: the base alone."""
    unique: list[LoraAdapter] = []
    rows: list[list[int]] = []
    for item in items:
        row = []
        for a in levels_of(item):
            slot = next((i for i, u in enumerate(unique) if u is a), None)  # identity: tensors don't compare
            if slot is None:
                unique.append(a)
                slot = len(unique) - 1
            row.append(slot)
        rows.append(row)
    if not unique:
        return None, None
    depth = max(len(r) for r in rows)
    return StackedWeights(unique, train=train), [r + [-1] * (depth - len(r)) for r in rows]
