"""Where the operator reads adapter weights from: a fixed pool of compute slots, or a step's stack.

* :class:`SlotTable` — serving. Tensors allocated once at ``(num_slots, max_rank)``; loading an adapter
  copies it into a slot (zero-padded to ``max_rank``), no allocation on the hot path.
* :class:`StackedWeights` — training (and one-off use). Per-user tensors stacked for one step; stacking is
  differentiable, so each user's parameters receive only the gradients of their own rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafleet.adapters.errors import AdapterError
from lorafleet.adapters.operator import LoraHost
from lorafleet.adapters.weights import LoraAdapter


class SlotTable:
    """``num_slots`` compute slots of rank ≤ ``max_rank`` for every wrapped layer of ``host``."""

    def __init__(self, host: LoraHost, num_slots: int, max_rank: int = 16, *, dtype=torch.float32, device=None) -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError(f"num_slots and max_rank must be >= 1, got {num_slots} and {max_rank}")
        device = device or next(host.model.parameters()).device
        self.num_slots, self.max_rank = num_slots, max_rank
        self.A: dict[str, Tensor] = {}
        self.B: dict[str, Tensor] = {}
        for name, layer in host.layers.items():
            self.A[name] = torch.zeros(num_slots, max_rank, layer.in_features, dtype=dtype, device=device)
            self.B[name] = torch.zeros(num_slots, layer.out_features, max_rank, dtype=dtype, device=device)
        self.scaling = torch.zeros(num_slots, dtype=dtype, device=device)
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)  # (S,) loaded rank, 0 = empty
        self.dropout = None
        self.used: set[str] = set()  # layers some loaded adapter touches

    def tensors(self, layer: str):
        return (self.A[layer], self.B[layer]) if layer in self.used else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.A.values(), *self.B.values()))

    @torch.no_grad()
    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy ``adapter`` into ``slot`` (overwriting what was there)."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range 0..{self.num_slots - 1}")
        r = adapter.spec.rank
        if r > self.max_rank:
            raise AdapterError(f"adapter rank {r} exceeds this slot table's max_rank {self.max_rank}")
        unknown = set(adapter.weights) - set(self.A)
        if unknown:
            raise AdapterError(f"adapter targets modules the host does not wrap: {sorted(unknown)[:3]}")
        self.clear(slot)
        for name, (A, B) in adapter.weights.items():
            self.A[name][slot, :r].copy_(A)
            self.B[name][slot, :, :r].copy_(B)
            self.used.add(name)
        self.scaling[slot] = adapter.spec.scaling
        self.ranks[slot] = r

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        for name in self.used:
            self.A[name][slot].zero_()
            self.B[name][slot].zero_()
        self.scaling[slot] = 0.0
        self.ranks[slot] = 0


class StackedWeights:
    """Adapters stacked into slot tensors for one forward: slot ``i`` is ``adapters[i]``.

    Ranks may differ: each is zero-padded to the largest. Stacking keeps autograd links to the inputs.
    """

    def __init__(self, adapters: list[LoraAdapter], *, train: bool = False) -> None:
        if not adapters:
            raise ValueError("StackedWeights needs at least one adapter")
        r_max = max(a.spec.rank for a in adapters)
        layers = sorted(set().union(*(a.weights for a in adapters)))
        self._ab: dict[str, tuple[Tensor, Tensor]] = {}
        for name in layers:
            ref_a, ref_b = next(a.weights[name] for a in adapters if name in a.weights)
            As, Bs = [], []
            for a in adapters:
                if name in a.weights:
                    A, B = a.weights[name]
                else:  # this adapter does not touch the layer: a zero delta
                    A, B = ref_a.new_zeros(a.spec.rank, ref_a.shape[1]), ref_b.new_zeros(ref_b.shape[0], a.spec.rank)
                pad = r_max - a.spec.rank
                As.append(F.pad(A, (0, 0, 0, pad)))  # (r_max, in)
                Bs.append(F.pad(B, (0, pad)))  # (out, r_max)
            self._ab[name] = (torch.stack(As), torch.stack(Bs))  # (S, r_max, in), (S, out, r_max)
        ref = next(iter(self._ab.values()))[0]
        self.scaling = torch.tensor([a.spec.scaling for a in adapters], dtype=ref.dtype, device=ref.device)
        drop = [a.spec.dropout for a in adapters]  # dropout is a training-time regulariser only
        self.dropout = torch.tensor(drop, dtype=ref.dtype, device=ref.device) if train and any(drop) else None

    def tensors(self, layer: str):
        return self._ab.get(layer)
