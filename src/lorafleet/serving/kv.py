r"""The engine's KV cache: one preallocated slab per layer, sequences right-aligned so they decode in lockstep.

::

    columns:   0 ...... start ............................ pos     capacity
    row 0      [ stale  |  ·  ·  ·  k k k k k k k k k k k k |  free  ]
    row 1      [ stale  |  k k k k k k k k k k k k k k k k k |  free  ]   lens[1] = pos - start (longest)
    row 2      [ stale  |  ·  ·  ·  ·  ·  ·  ·  ·  k k k k k |  free  ]   joined late, short prompt

Row ``b`` holds its ``lens[b]`` cached tokens at columns ``[pos - lens[b], pos)``. A decode step writes every
row's new token at column ``pos`` and attends over ``[start, pos]`` with a mask that hides each row's columns
left of its own tokens; then ``pos += 1``. A joining sequence is prefilled on its own (:class:`KVSlab` with its
own rows) and copied in so that it ends at ``pos``; a finished one is dropped by moving the last rows into its
place. Writes are in place (no ``torch.cat`` per step); when the slab runs out of columns the live window is
moved back to the left (or into a larger slab), which costs one copy every ``O(width)`` steps.

Columns outside a row's window hold stale but finite keys/values (the slab starts zeroed and only ever gets
real keys/values), so masked positions contribute exactly 0 to attention.

:class:`SlabCache` adapts a slab to transformers' ``Cache`` interface: each attention layer's ``update`` writes
the new keys/values into the slab and returns the attended window as a view.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

_ROUND = 64  # slab capacities are multiples of this many columns


def _round_up(n: int) -> int:
    return -(-n // _ROUND) * _ROUND


class _SlabLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    supports_early_init = False

    def __init__(self, slab: KVSlab, index: int) -> None:
        super().__init__()
        self.slab, self.index = slab, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return self.slab.write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slab.pos - self.slab.start + query_length, 0

    def get_seq_length(self) -> int:
        return self.slab.pos - self.slab.start

    def get_max_length(self) -> int:
        return -1


class SlabCache(Cache):
    """transformers ``Cache`` view of a :class:`KVSlab` (the engine always passes an explicit 4-D mask)."""

    def __init__(self, slab: KVSlab) -> None:
        super().__init__(layers=[_SlabLayer(slab, i) for i in range(slab.num_layers)])
        self.slab = slab


class KVSlab:
    """K/V buffers ``(rows, kv_heads, capacity, head_dim)`` per layer, rows right-aligned at column ``pos``."""

    def __init__(self, num_layers: int, rows: int, kv_heads: int, head_dim: int, *, capacity: int = _ROUND,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.num_layers, self.max_rows, self.kv_heads, self.head_dim = num_layers, rows, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = _round_up(max(capacity, 1))
        self.k = [self._zeros(self.capacity) for _ in range(num_layers)]
        self.v = [self._zeros(self.capacity) for _ in range(num_layers)]
        self.count = 0  # rows in use: 0 .. count-1
        self.pos = 0  # next column to write
        self.lens: list[int] = []  # cached tokens per row in use
        self.lens_t = torch.zeros(rows, dtype=torch.long, device=self.device)  # (rows,) same, on the device
        self.reserve = 0  # columns kept free on the left when relocating (longest prompt seen)
        self.relocations = 0
        # The window of the forward in progress: rows [0, n), write columns [w0, w1), attend [start, w1).
        self._n, self._w0, self._w1, self.start = 0, 0, 0, 0
        self.cache = SlabCache(self)

    def _zeros(self, capacity: int) -> Tensor:
        return torch.zeros(self.max_rows, self.kv_heads, capacity, self.head_dim, dtype=self.dtype, device=self.device)

    @property
    def width(self) -> int:
        """Columns the longest row in use needs."""
        return max(self.lens, default=0)

    @property
    def nbytes(self) -> int:
        return 2 * self.num_layers * self.k[0].numel() * self.k[0].element_size()

    # -- the Cache hook --------------------------------------------------------------------------------------

    def write(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store a forward's new keys/values ``(n, kv_heads, w1 - w0, head_dim)``; return the attended window."""
        n, w0, w1, s = self._n, self._w0, self._w1, self.start
        k, v = self.k[layer], self.v[layer]
        k[:n, :, w0:w1].copy_(key)
        v[:n, :, w0:w1].copy_(value)
        return k[:n, :, s:w1], v[:n, :, s:w1]

    # -- decode ----------------------------------------------------------------------------------------------

    def begin_decode(self) -> tuple[Tensor, Tensor]:
        """Prepare a one-token step of every row; returns ``(mask (n, 1, 1, W+1) bool, positions (n, 1))``."""
        n, width = self.count, self.width
        self.ensure(left=width, right=1)
        self._n, self._w0, self._w1, self.start = n, self.pos, self.pos + 1, self.pos - width
        cols = torch.arange(self.start, self.pos + 1, device=self.device)  # (W+1,)
        first = self.pos - self.lens_t[:n]  # (n,) first column of each row
        mask = cols[None, :] >= first[:, None]  # (n, W+1)
        return mask[:, None, None, :], self.lens_t[:n, None].clone()

    def end_decode(self) -> None:
        self.pos += 1
        self.lens_t[: self.count] += 1
        self.lens = [n + 1 for n in self.lens]

    # -- prefill (a slab of its own, one per group of joining sequences) -------------------------------------

    def prefill_chunk(self, c0: int, c1: int, pads: Tensor) -> tuple[Tensor, Tensor]:
        """Prepare columns ``[c0, c1)`` of a left-padded prefill (row ``i`` starts at column ``pads[i]``).

        Returns ``(mask (n, 1, T, c1) bool, positions (n, T))``. Padding queries attend to themselves only, so
        no row of the softmax is empty (an empty one would be NaN and poison the cache).
        """
        n = self.count
        self._n, self._w0, self._w1, self.start = n, c0, c1, 0
        q = torch.arange(c0, c1, device=self.device)  # (T,)
        k = torch.arange(0, c1, device=self.device)  # (c1,)
        causal = k[None, None, :] <= q[None, :, None]  # (1, T, c1)
        mask = (causal & (k[None, None, :] >= pads[:, None, None])) | (k[None, None, :] == q[None, :, None])
        positions = (q[None, :] - pads[:, None]).clamp(min=0)  # (n, T)
        return mask[:, None], positions

    # -- layout ----------------------------------------------------------------------------------------------

    def ensure(self, left: int, right: int) -> None:
        """Make columns ``[pos - left, pos + right)`` fit, moving the live window (or growing) if needed."""
        if self.pos >= left and self.pos + right <= self.capacity:
            return
        width = self.width
        new_pos = max(left, self.reserve)
        capacity = max(self.capacity, _round_up(new_pos + max(right, width // 2, _ROUND // 2)))
        lo, n = self.pos - width, self.count
        if capacity != self.capacity:
            for buffers in (self.k, self.v):
                for i, old in enumerate(buffers):
                    new = self._zeros(capacity)
                    new[:n, :, new_pos - width : new_pos] = old[:n, :, lo : self.pos]
                    buffers[i] = new
            self.capacity = capacity
        elif new_pos != self.pos:
            for buffers in (self.k, self.v):
                for buf in buffers:
                    window = buf[:n, :, lo : self.pos].clone()
                    buf[:n, :, new_pos - width : new_pos] = window
        self.pos = new_pos
        self.relocations += 1

    def insert(self, src: KVSlab, src_rows: list[int]) -> int:
        """Append rows of a finished prefill slab (all ending at its ``pos``); returns the first new row index."""
        m, width_src = len(src_rows), src.pos
        if self.count + m > self.max_rows:
            raise ValueError(f"slab has {self.max_rows - self.count} free rows, {m} needed")
        self.reserve = max(self.reserve, width_src)
        self.ensure(left=max(self.width, width_src), right=1)
        r0, a, b = self.count, self.pos - width_src, self.pos
        idx = torch.tensor(src_rows, dtype=torch.long, device=self.device)
        for dst, srcs in ((self.k, src.k), (self.v, src.v)):
            for layer in range(self.num_layers):
                dst[layer][r0 : r0 + m, :, a:b] = srcs[layer].index_select(0, idx)[:, :, :width_src]
        lens = [src.lens[i] for i in src_rows]
        self.lens_t[r0 : r0 + m] = torch.tensor(lens, dtype=torch.long, device=self.device)
        self.lens.extend(lens)
        self.count += m
        return r0

    def remove(self, rows: list[int]) -> list[tuple[int, int]]:
        """Drop ``rows``; the last surviving rows move into the holes. Returns the ``(src, dst)`` moves."""
        gone = set(rows)
        n = self.count
        keep = n - len(gone)
        holes = sorted(r for r in gone if r < keep)
        movers = [r for r in range(keep, n) if r not in gone]
        moves = list(zip(movers, holes, strict=True))
        if moves:
            src = torch.tensor(movers, dtype=torch.long, device=self.device)
            dst = torch.tensor(holes, dtype=torch.long, device=self.device)
            lo = self.pos - self.width
            for buffers in (self.k, self.v):
                for buf in buffers:
                    window = buf[:, :, lo : self.pos]
                    window.index_copy_(0, dst, window.index_select(0, src))
            self.lens_t.index_copy_(0, dst, self.lens_t.index_select(0, src))
            for s, d in moves:
                self.lens[d] = self.lens[s]
        del self.lens[keep:]
        self.count = keep
        if keep == 0:
            self.pos = self.reserve  # empty: restart at the left edge (plus room for a joining prompt)
        return moves

    def reset(self) -> None:
        self.count, self.lens = 0, []
        self.pos = 0
