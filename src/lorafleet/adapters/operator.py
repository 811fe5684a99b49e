r"""The multi-adapter LoRA operator: the one place where LoRA math lives.

A :class:`MultiLoraLinear` wraps a frozen base ``nn.Linear`` and adds, for each batch row, the delta of
that row's adapter(s). Training (per-user parameters stacked for the step) and serving (a fixed pool of
compute slots) both go through :func:`lora_delta`.

::

            x ──────────────► base W ─────────────┐
            │                                      ▼
            └─► A[slot(row)] ─► B[slot(row)] ─► × scaling ─► (+) ─► y

Semantics (the reference, :func:`lora_delta_reference`; every fast path must equal it)::

    # x: (Bsz, T, in)  A: (S, r, in)  B: (S, out, r)  scaling: (S,)  slots: (Bsz, L), -1 = none
    delta = zeros(Bsz, T, out)
    for b in range(Bsz):
        for level in range(L):              # L > 1: a stack of adapters, deltas summed
            s = slots[b, level]
            if s < 0:
                continue
            delta[b] += scaling[s] * (x[b] @ A[s].T) @ B[s].T
    y = base(x) + delta

Adapters of different ranks share one slot table: a rank-r adapter fills the first r rows of ``A[s]`` and
the first r columns of ``B[s]``, the rest stays zero, which contributes exactly nothing.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor, nn

from lorafleet.adapters import triton_lora  # imports triton lazily, on first kernel use
from lorafleet.adapters.spec import ATTENTION_TARGETS, MLP_TARGETS

# From this many tokens per row on, the segmented path (one matmul pair per adapter over all its rows'
# tokens) wins over per-row gathered weights; decode steps (T == 1) take the gather + bmm path.
GROUPED_MIN_TOKENS = 2


def _as_levels(slots: Tensor) -> Tensor:
    return slots.unsqueeze(1) if slots.dim() == 1 else slots  # (Bsz,) -> (Bsz, 1)


def lora_delta_reference(x: Tensor, A: Tensor, B: Tensor, scaling: Tensor, slots: Tensor) -> Tensor:
    """Plain-loop reference of the operator (see the module docstring). Slow; for tests only."""
    slots = _as_levels(slots)
    delta = x.new_zeros(x.shape[0], x.shape[1], B.shape[1])  # (Bsz, T, out)
    for b in range(x.shape[0]):
        for level in range(slots.shape[1]):
            s = int(slots[b, level])
            if s < 0:
                continue
            delta[b] += scaling[s] * (x[b] @ A[s].T) @ B[s].T
    return delta


def _row_dropout(x: Tensor, p: Tensor) -> Tensor:
    """Inverted dropout with a per-row probability ``p: (n,)`` on ``x: (n, T, in)``."""
    keep = 1.0 - p[:, None, None]  # (n, 1, 1)
    mask = (torch.rand_like(x) < keep).to(x.dtype)
    return x * mask / keep


def _gather_bmm(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, idx: Tensor) -> Tensor:
    """Rows ``x: (n, T, in)`` each with slot ``idx: (n,)``; per-row weights gathered, two bmm."""
    a = A.index_select(0, idx)  # (n, r, in)
    b = B.index_select(0, idx)  # (n, out, r)
    h = torch.bmm(x, a.transpose(1, 2))  # (n, T, r)
    h = h * scale.index_select(0, idx)[:, None, None]
    return torch.bmm(h, b.transpose(1, 2))  # (n, T, out)


def _segmented(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, idx: Tensor) -> Tensor:
    """Same result as :func:`_gather_bmm`: rows sorted by slot, one pair of matmuls per run of equal slots.

    Rows already grouped by adapter (a training step packs each user's rows together) need no copy at all:
    each run is a view of ``x``.
    """
    grouped = idx.numel() < 2 or bool((idx[1:] >= idx[:-1]).all())
    if not grouped:
        order = torch.argsort(idx, stable=True)
        x, idx = x.index_select(0, order), idx.index_select(0, order)
    slots, counts = torch.unique_consecutive(idx, return_counts=True)
    parts, start = [], 0
    for s, c in zip(slots.tolist(), counts.tolist(), strict=True):
        xs = x[start : start + c]  # (m, T, in), a view
        start += c
        parts.append(((xs @ A[s].T) * scale[s]) @ B[s].T)  # (m, T, out)
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    if not grouped:
        out = out.index_select(0, torch.argsort(order))  # back to the callers' row order
    return out


class _Plan:
    """How one level's rows map onto padded per-slot groups for :func:`_padded` (computed once per routing and
    shared by every projection: it depends on the slots alone).

    ``rows``: the rows with an adapter at this level (None: all); ``pick``: which slots' weights the groups read
    (None: the whole table, a slice: one adapter as a view, a tensor: the few used of many, copied once);
    ``dest``: row -> padded position; ``src``: padded position -> row where the groups need no padding (then the
    placement is one gather, and nothing at all when it is the identity, e.g. every row on one adapter)."""

    def __init__(self, level_slots: Tensor, num_slots: int) -> None:
        valid = level_slots >= 0
        n_valid = int(valid.sum())
        self.empty = n_valid == 0
        if self.empty:
            return
        if n_valid == level_slots.numel():  # every row has an adapter: no gather of x needed
            self.rows, idx = None, level_slots
        else:
            self.rows = valid.nonzero(as_tuple=True)[0]
            idx = level_slots.index_select(0, self.rows)
        self.idx = idx
        n = idx.numel()
        used, inverse = torch.unique(idx, return_inverse=True)  # (u,), (n,)
        self.used = used
        u = used.numel()
        if u == 1:  # one adapter for every row: its weights as a view, one group
            s = int(used[0])
            self.pick, group, self.groups = slice(s, s + 1), torch.zeros_like(idx), 1
        elif 3 * u >= num_slots:  # read the whole table once: no copy of any adapter's weights
            self.pick, group, self.groups = None, idx, num_slots
        else:  # few of many slots: copy those adapters once, then read them once
            self.pick, group, self.groups = used, inverse, u
        counts = torch.bincount(group, minlength=self.groups)
        self.width = int(counts.max())
        order = torch.argsort(group, stable=True)
        starts = torch.cumsum(counts, 0) - counts  # (groups,) first sorted position of each group
        within = torch.empty_like(order)
        within[order] = torch.arange(n, device=idx.device) - starts.index_select(0, group.index_select(0, order))
        self.dest = group * self.width + within  # (n,) row -> padded position
        padded = self.groups * self.width
        # padding costs groups * width rows of work for n real ones: fine for one-token rows, bounded for prompts
        self.compact = padded <= 2 * n
        self.src = torch.argsort(self.dest) if padded == n else None  # a permutation: padded position -> row
        self.identity = self.src is not None and bool((self.dest == torch.arange(n, device=idx.device)).all())
        self._scale_of = None  # (scaling tensor, its uniform value over the used slots or None), cached

    def uniform_scale(self, scaling: Tensor) -> float | None:
        """The one scaling every used slot shares (then it is folded into the final add), else None."""
        if self._scale_of is None or self._scale_of[0] is not scaling:
            values = scaling.index_select(0, self.used).unique()
            self._scale_of = (scaling, float(values[0]) if values.numel() == 1 else None)
        return self._scale_of[1]


def _padded(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, plan: _Plan) -> tuple[Tensor, float]:
    """Rows ``x: (n, T, in)`` (the plan's rows) placed into padded per-slot groups ``(G, width, in)``; each slot's
    ``A``/``B`` is read once by two ``bmm``. Returns ``(part, alpha)``: the delta is ``alpha * part`` (the slots'
    shared scaling is left to the caller's add; mixed scalings are applied per group and ``alpha`` is 1)."""
    n, t, d_in = x.shape
    alpha = plan.uniform_scale(scale)
    if plan.pick is not None:
        A, B, scale = A[plan.pick], B[plan.pick], scale[plan.pick]
    g, w, d_out = plan.groups, plan.width, B.shape[1]
    if plan.identity:
        xp = x.reshape(g, w * t, d_in)
    elif plan.src is not None:
        xp = x.reshape(n, t * d_in).index_select(0, plan.src).view(g, w * t, d_in)
    else:
        xp = x.new_zeros(g * w, t * d_in).index_copy_(0, plan.dest, x.reshape(n, t * d_in)).view(g, w * t, d_in)
    h = torch.bmm(xp, A.transpose(1, 2))  # (G, w*T, r)
    if alpha is None:
        h = h * scale[:, None, None]
    out = torch.bmm(h, B.transpose(1, 2))  # (G, w*T, out)
    if not plan.identity:
        out = out.view(g * w, t * d_out).index_select(0, plan.dest)
    return out.view(n, t, d_out), (1.0 if alpha is None else alpha)


def _padded_bmm(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, plan: _Plan) -> Tensor:
    """Same result as :func:`_gather_bmm`, without a per-row copy of the weights (see :func:`_padded`): for decode
    steps of many rows over many adapters this reads each adapter once per step instead of once per row."""
    part, alpha = _padded(x, A, B, scale, plan)
    return part if alpha == 1.0 else part * alpha


def _is_inference(x: Tensor, A: Tensor, B: Tensor, dropout: Tensor | None) -> bool:
    return dropout is None and not (torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad))


def _plan_for(plans: dict | None, slots: Tensor, level: int, num_slots: int) -> _Plan:
    key = (level, num_slots)
    plan = None if plans is None else plans.get(key)
    if plan is None:
        plan = _Plan(slots[:, level], num_slots)
        if plans is not None:
            plans[key] = plan
    return plan


def lora_delta(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    scaling: Tensor,
    slots: Tensor,
    dropout: Tensor | None = None,
    plans: dict | None = None,
) -> Tensor:
    """The operator's fast path. Shapes as in the module docstring; returns ``delta: (Bsz, T, out)``.

    Only rows with an adapter are computed. Inference (no grad) places rows into padded per-slot groups and runs
    two ``bmm`` that read each adapter once (:func:`_padded`) — always for decode (``T == 1``), for prompts when
    the padding at most doubles the rows; otherwise (training, skewed prompts) ``T > 1`` runs one matmul pair per
    adapter over all its rows' tokens and decode with gradients gathers per-row weights. ``dropout: (S,)``
    per-slot probabilities (training only). ``plans``: a dict the caller keeps for one routing (the same slots) so
    the row placement is computed once for all projections. Differentiable w.r.t. ``x``, ``A`` and ``B``.
    """
    if triton_lora.wants_triton(x, A, B, dropout):  # CUDA inference: the Triton kernels (docs/operator.md)
        return triton_lora.lora_delta_triton(x, A, B, scaling, slots)
    slots = _as_levels(slots)
    inference = _is_inference(x, A, B, dropout)
    delta: Tensor | None = None
    for level in range(slots.shape[1]):
        if inference:
            plan = _plan_for(plans, slots, level, A.shape[0])
            if plan.empty:
                continue
            rows, idx = plan.rows, plan.idx
        else:
            plan, s = None, slots[:, level]
            valid = s >= 0
            n_valid = int(valid.sum())
            if n_valid == 0:
                continue
            rows = None if n_valid == s.numel() else valid.nonzero(as_tuple=True)[0]
            idx = s if rows is None else s.index_select(0, rows)
        xs = x if rows is None else x.index_select(0, rows)  # (n, T, in)
        if dropout is not None:
            xs = _row_dropout(xs, dropout.index_select(0, idx))
        if plan is not None and (x.shape[1] == 1 or plan.compact):
            part = _padded_bmm(xs, A, B, scaling, plan)
        elif x.shape[1] >= GROUPED_MIN_TOKENS:
            part = _segmented(xs, A, B, scaling, idx)
        else:
            part = _gather_bmm(xs, A, B, scaling, idx)
        if rows is not None:
            part = x.new_zeros(x.shape[0], x.shape[1], B.shape[1]).index_add(0, rows, part)
        delta = part if delta is None else delta + part
    if delta is None:
        return x.new_zeros(x.shape[0], x.shape[1], B.shape[1])
    return delta


def lora_add(
    y: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    scaling: Tensor,
    slots: Tensor,
    dropout: Tensor | None = None,
    plans: dict | None = None,
) -> Tensor:
    """``y + lora_delta(x, ...)`` with ``y: (Bsz, T, out)`` the base output; a new tensor, ``y`` is not modified.

    For inference on the padded path (decode, compact prompts) each level's part is added in one op with the slots'
    shared scaling folded into that add (``index_add`` for a level where only some rows have an adapter): a decode
    step then costs two ``bmm`` and one add per projection where every row has an adapter."""
    slots = _as_levels(slots)
    if triton_lora.wants_triton(x, A, B, dropout) or not _is_inference(x, A, B, dropout):
        return y + lora_delta(x, A, B, scaling, slots, dropout, plans).to(y.dtype)
    levels = [_plan_for(plans, slots, level, A.shape[0]) for level in range(slots.shape[1])]
    if not all(p.empty or x.shape[1] == 1 or p.compact for p in levels):
        return y + lora_delta(x, A, B, scaling, slots, dropout, plans).to(y.dtype)
    for plan in levels:
        if plan.empty:
            continue
        part, alpha = _padded(x if plan.rows is None else x.index_select(0, plan.rows), A, B, scaling, plan)
        part = part.to(y.dtype)
        y = torch.add(y, part, alpha=alpha) if plan.rows is None else y.index_add(0, plan.rows, part, alpha=alpha)
    return y


class SlotWeights(Protocol):
    """What a forward reads its adapters from: a serving pool or a training step's stack."""

    scaling: Tensor  # (S,)
    dropout: Tensor | None  # (S,) training only

    def tensors(self, layer: str) -> tuple[Tensor, Tensor] | None:
        """``(A: (S, r, in), B: (S, out, r))`` for a wrapped layer, or None if no slot touches it."""
class LoraRouting(threading.local):
    """Per-thread routing for one model: which slot each row uses, and where slot weights live.

    Thread-local, so a training thread and a serving thread can share the resident base.
    """

    def __init__(self) -> None:
        self.slots: Tensor | None = None  # (Bsz, L) long, -1 = no adapter; None = base only
        self.table: SlotWeights | None = None
        self.plans: dict = {}  # the operator's row placement for these slots, shared by every projection


class MultiLoraLinear(nn.Module):
    """A frozen base linear plus per-row LoRA deltas read from the routed :class:`SlotWeights`."""

    def __init__(self, base: nn.Linear, name: str, routing: LoraRouting) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.routing = routing

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:  # transformers sometimes reads .weight (dtype/device checks)
        if not isinstance(self.base, nn.Linear):  # a low-precision base's frozen layer (packed int4/int8 codes)
            raise AttributeError(f"{self.name} runs a {self.base.kind} base weight; it has no float .weight")
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.add_delta(x, self.base(x))

    def add_delta(self, x: Tensor, y: Tensor) -> Tensor:
        """``y`` (this layer's base output for ``x``, computed by the caller, e.g. one fused kernel call for several
        projections) plus the routed rows' LoRA deltas; ``y`` itself when no row has an adapter here."""
        slots, table = self.routing.slots, self.routing.table
        if slots is None or table is None:
            return y
        ab = table.tensors(self.name)
        if ab is None:
            return y
        shape = x.shape
        x3 = x.reshape(shape[0], -1, shape[-1])  # (Bsz, T, in)
        if triton_lora.wants_triton(x3, ab[0], ab[1], table.dropout) and y.is_contiguous() and not y.requires_grad:
            y3 = y.view(shape[0], x3.shape[1], -1)  # (Bsz, T, out): the kernels accumulate into the base output
            triton_lora.lora_add_(y3, x3.contiguous(), ab[0], ab[1], table.scaling, slots, getattr(table, "ranks", None))
            return y
        y3 = y.reshape(shape[0], x3.shape[1], -1)  # (Bsz, T, out)
        out = lora_add(y3, x3, ab[0], ab[1], table.scaling, slots, table.dropout, self.routing.plans)
        return out.reshape(y.shape)


def _is_base_linear(module: nn.Module) -> bool:
    """A float ``nn.Linear``, or a frozen low-precision linear of the base (one that declares
    ``frozen_base_linear = True`` and has in/out features, e.g. ``lorafleet.base.precision.QuantLinear``):
    the operator wraps both the same way, so it needs to know nothing of how the base stores its weights."""
    return isinstance(module, nn.Linear) or bool(getattr(module, "frozen_base_linear", False))


class LoraHost:
    """Wraps a base model's target linears with :class:`MultiLoraLinear` once, and routes rows to slots.

    One host per model object (kept on the model), so training and serving in one process share it.
    """

    def __init__(self, model: nn.Module, projections: tuple[str, ...]) -> None:
        self.model = model
        self.routing = LoraRouting()
        self.layers: dict[str, MultiLoraLinear] = {}
        for name, module in list(model.named_modules()):
            if ".layers." not in name or not _is_base_linear(module):
                continue
            if name.rsplit(".", 1)[-1] not in projections:
                continue
            parent_name, _, child = name.rpartition(".")
            wrapped = MultiLoraLinear(module, name, self.routing)
            setattr(model.get_submodule(parent_name), child, wrapped)
            self.layers[name] = wrapped

    @classmethod
    def attach(cls, model: nn.Module, projections: tuple[str, ...] | None = None) -> LoraHost:
        """The host of ``model``, wrapping every targetable projection on first use."""
        host = getattr(model, "_lorafleet_host", None)
        if host is None:
            host = cls(model, projections or ATTENTION_TARGETS + MLP_TARGETS)
            model._lorafleet_host = host
        return host

    @contextmanager
    def route(self, table: SlotWeights | None, slots: Tensor | list | None):
        """Within the block (this thread), row ``b`` of every forward uses ``table`` slot ``slots[b]``.

        ``slots`` is ``(Bsz,)`` or ``(Bsz, L)`` for stacks; ``-1`` = no adapter; ``None`` = base only.
        """
        previous = (self.routing.slots, self.routing.table, self.routing.plans)
        if slots is not None and not isinstance(slots, Tensor):
            slots = torch.tensor(slots, dtype=torch.long)
        device = next(self.model.parameters()).device
        # a private copy: the kernels' per-forward segment plan may be reused while this routing is unchanged
        self.routing.slots = None if slots is None else _as_levels(slots.to(device=device, dtype=torch.long)).clone()
        self.routing.table = table
        self.routing.plans = {}
        try:
            yield self
        finally:
            self.routing.slots, self.routing.table, self.routing.plans = previous
