r"""Triton kernels for the multi-adapter operator on CUDA (SGMV/BGMV-style, after Punica and S-LoRA).

Same semantics as :func:`lorafleet.adapters.operator.lora_delta_reference`, computed without per-row weight
copies: every program reads its adapter's ``A[s]`` / ``B[s]`` straight from the slot table, by slot index.

::

    decode  (T == 1)  shrink: grid (rows, levels, split_k)   h[k, l, m, :] = x[m, k-th slice] · A[s(m, l)]ᵀ
                      expand: grid (rows, out / BLOCK_N)      y[m, n] += Σ_l scaling[s] · Σ_k h[k, l, m, :] · B[s, n]
    prefill (T > 1)   per level: token rows sorted by slot into per-adapter segments of BLOCK_M rows (on the
                      device, no host sync); shrink: grid (blocks,)  expand: grid (blocks, out / BLOCK_N),
                      both ``tl.dot`` on a (BLOCK_M × rank) tile with the segment's one adapter

``-1`` rows are masked (no weight is read for them). Mixed ranks: slots are zero-padded to ``r_max``; with a
per-slot ``ranks: (S,)`` the loads of the padding are masked out too (fewer bytes on a memory-bound decode).
Stacks (``slots: (Bsz, L)``): decode sums the levels inside one expand program; prefill runs one kernel pair
per level (each level is a disjoint segmentation, so accumulation into ``y`` never races).

Inference only: no autograd. The operator dispatches here on CUDA (see :func:`wants_triton`); the torch
paths stay the reference and the CPU path. ``triton`` is imported lazily: CPU installs without it work.
Tests run these kernels in Triton's CPU interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
from torch import Tensor

ENV = "LORAFLEET_LORA_KERNEL"  # auto (default: triton on CUDA when importable) | triton (force) | torch (never)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` imports (it is an optional dependency)."""
    try:
        import triton  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 - an ImportError or a broken install: both mean "not available"
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"{ENV} must be 'auto', 'triton' or 'torch', got {mode!r}")
    return mode


def wants_triton(x: Tensor, A: Tensor, B: Tensor, dropout: Tensor | None = None) -> bool:
    """Whether the operator should take the Triton path for this call.

    Only for inference (no dropout, no autograd), matching dtypes, on CUDA — or on CPU tensors when forced
    with ``LORAFLEET_LORA_KERNEL=triton`` under ``TRITON_INTERPRET=1`` (the tests).
    """
    mode = kernel_mode()
    if mode == "torch" or dropout is not None:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return False
    if x.dtype not in DTYPES or A.dtype != x.dtype or B.dtype != x.dtype:
        return False
    if x.is_cuda:
        return mode in ("auto", "triton") and triton_available()
    return mode == "triton" and interpreting() and triton_available()


# -- kernels (built on first use, so that importing this module never imports triton) --------------------------


@functools.cache
def _kernels():
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    @triton.jit
    def _decode_shrink(x_ptr, a_ptr, slot_ptr, rank_ptr, h_ptr,
                       M, K, T, L, k_per_split,
                       sxm, sas, sar, sak, shs, shl, shm,
                       HAS_RANKS: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        # one token row m, one level l, one K-slice: h[split, l, m, :R] = x[m, slice] · A[s, :R, slice]ᵀ
        m = tl.program_id(0)
        lvl = tl.program_id(1)
        split = tl.program_id(2)
        s = tl.load(slot_ptr + (m // T) * L + lvl)  # slot of this row's level (slots: (Bsz, L) contiguous)
        live = s >= 0
        s_safe = tl.maximum(s, 0).to(tl.int64)
        rank = R
        if HAS_RANKS:
            rank = tl.load(rank_ptr + s_safe)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < tl.where(live, tl.minimum(rank, R), 0)  # block masks only (interpreter-safe)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        k0 = split * k_per_split
        for kk in range(0, k_per_split, BLOCK_K):
            offs_k = k0 + kk + tl.arange(0, BLOCK_K)
            k_mask = (offs_k < K) & (offs_k < k0 + k_per_split)
            xv = tl.load(x_ptr + m.to(tl.int64) * sxm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + s_safe * sas + offs_r[:, None] * sar + offs_k[None, :] * sak,
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_K)
            acc += tl.sum(a * xv[None, :], axis=1)
        tl.store(h_ptr + split * shs + lvl * shl + m.to(tl.int64) * shm + offs_r, acc, mask=offs_r < BLOCK_R)

    @triton.jit
    def _decode_expand(y_ptr, b_ptr, slot_ptr, rank_ptr, scale_ptr, h_ptr,
                       M, N, T, L, SPLIT,
                       sym, sbs, sbn, sbr, shs, shl, shm,
                       HAS_RANKS: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        # one token row m, BLOCK_N outputs: y[m, n] += Σ_l scaling[s_l] · h_l · B[s_l, n, :]ᵀ
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        n_live = tl.full([], 0, tl.int32)
        for lvl in range(L):
            s = tl.load(slot_ptr + (m // T) * L + lvl)
            live = s >= 0
            n_live += live.to(tl.int32)
            s_safe = tl.maximum(s, 0).to(tl.int64)
            rank = R
            if HAS_RANKS:
                rank = tl.load(rank_ptr + s_safe)
            r_mask = offs_r < tl.where(live, tl.minimum(rank, R), 0)  # block masks only (interpreter-safe)
            h = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for sp in range(SPLIT):
                h += tl.load(h_ptr + sp * shs + lvl * shl + m.to(tl.int64) * shm + offs_r, mask=r_mask, other=0.0)
            scale = tl.load(scale_ptr + s_safe).to(tl.float32)  # dead levels: h is 0
            b = tl.load(b_ptr + s_safe * sbs + offs_n[:, None] * sbn + offs_r[None, :] * sbr,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_R)
            acc += tl.sum(b * h[None, :], axis=1) * scale
        y_ptrs = y_ptr + m.to(tl.int64) * sym + offs_n
        out_mask = offs_n < tl.where(n_live > 0, N, 0)  # rows with no adapter: y untouched
        y = tl.load(y_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _segment_shrink(x_ptr, a_ptr, rank_ptr, scale_ptr, order_ptr, blk_slot_ptr, blk_row0_ptr, blk_row1_ptr,
                        h_ptr, K,
                        sxm, sas, sar, sak, shm,
                        HAS_RANKS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        # one block of ≤ BLOCK_M token rows of one adapter's segment: h[rows] = scaling · x[rows] · A[s]ᵀ
        blk = tl.program_id(0)
        s = tl.load(blk_slot_ptr + blk)
        row0 = tl.load(blk_row0_ptr + blk)
        row1 = tl.load(blk_row1_ptr + blk)
        live = s >= 0
        s_safe = tl.maximum(s, 0).to(tl.int64)
        rank = R
        if HAS_RANKS:
            rank = tl.load(rank_ptr + s_safe)
        offs_i = row0 + tl.arange(0, BLOCK_M)  # positions in the sorted order
        i_mask = offs_i < row1  # dead blocks have row0 == row1
        rows = tl.load(order_ptr + offs_i, mask=i_mask, other=0).to(tl.int64)  # token rows of x
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < tl.where(live, tl.minimum(rank, R), 0)  # block masks only (interpreter-safe)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xt = tl.load(x_ptr + rows[:, None] * sxm + offs_k[None, :], mask=i_mask[:, None] & k_mask[None, :],
                         other=0.0)  # (BLOCK_M, BLOCK_K)
            at = tl.load(a_ptr + s_safe * sas + offs_r[None, :] * sar + offs_k[:, None] * sak,
                         mask=r_mask[None, :] & k_mask[:, None], other=0.0)  # (BLOCK_K, BLOCK_R) = A[s]ᵀ tile
            if IEEE:  # fp32 operands, no TF32 rounding
                acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
            else:  # bf16/fp16 operands on tensor cores, fp32 accumulation
                acc += tl.dot(xt, at)
        scale = tl.load(scale_ptr + s_safe).to(tl.float32)
        tl.store(h_ptr + offs_i[:, None].to(tl.int64) * shm + offs_r[None, :], acc * scale,
                 mask=i_mask[:, None] & (offs_r[None, :] < BLOCK_R))

    @triton.jit
    def _segment_expand(y_ptr, b_ptr, rank_ptr, order_ptr, blk_slot_ptr, blk_row0_ptr, blk_row1_ptr, h_ptr, N,
                        sym, sbs, sbn, sbr, shm,
                        HAS_RANKS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        # y[rows, n-block] += h[rows] · B[s, n-block]ᵀ  (h already scaled)
        blk = tl.program_id(0)
        pid_n = tl.program_id(1)
        s = tl.load(blk_slot_ptr + blk)
        row0 = tl.load(blk_row0_ptr + blk)
        row1 = tl.load(blk_row1_ptr + blk)
        live = s >= 0
        s_safe = tl.maximum(s, 0).to(tl.int64)
        rank = R
        if HAS_RANKS:
            rank = tl.load(rank_ptr + s_safe)
        offs_i = row0 + tl.arange(0, BLOCK_M)
        i_mask = offs_i < row1  # dead blocks have row0 == row1
        rows = tl.load(order_ptr + offs_i, mask=i_mask, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < tl.where(live, tl.minimum(rank, R), 0)  # block masks only (interpreter-safe)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        h = tl.load(h_ptr + offs_i[:, None].to(tl.int64) * shm + offs_r[None, :],
                    mask=i_mask[:, None] & r_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_R) fp32
        bt = tl.load(b_ptr + s_safe * sbs + offs_r[:, None] * sbr + offs_n[None, :] * sbn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_R, BLOCK_N) = B[s]ᵀ tile
        if IEEE:
            acc = tl.dot(h, bt.to(tl.float32), input_precision="ieee")  # h is fp32
        else:
            acc = tl.dot(h.to(bt.dtype), bt)
        y_ptrs = y_ptr + rows[:, None] * sym + offs_n[None, :]
        mask = i_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)

    return {"decode_shrink": _decode_shrink, "decode_expand": _decode_expand,
            "segment_shrink": _segment_shrink, "segment_expand": _segment_expand, "cdiv": triton.cdiv,
            "next_pow2": triton.next_power_of_2}


# -- host side ------------------------------------------------------------------------------------------------


def _blocks_r(r_max: int) -> int:
    return max(16, 1 << (r_max - 1).bit_length())  # tl.dot needs >= 16; a power of two for tl.arange


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _decode_split(rows: int, levels: int, k: int, block_k: int, device: torch.device) -> int:
    """Split-K factor for the decode shrink: enough programs to fill the GPU when the batch is small."""
    if device.type != "cuda":
        return 1 if k <= 2 * block_k else 2  # interpreter: exercise the split path, cheaply
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = max(1, (4 * sms) // max(1, rows * levels))
    return max(1, min(want, (k + block_k - 1) // block_k, 64))


def segment_plan(slots_level: Tensor, T: int, num_slots: int, block_m: int) -> tuple[Tensor, ...]:
    """Per-adapter segments of one level's token rows, as BLOCK_M-row blocks; all on the device, no sync.

    ``slots_level: (Bsz,)`` → ``order: (M,)`` token rows sorted by slot (``M = Bsz·T``; ``-1`` rows last),
    and per block ``slot, row0, row1`` (positions ``[row0, row1)`` of ``order``). The grid is an upper bound
    (``cdiv(M, BLOCK_M) + min(S, Bsz)`` blocks); blocks past the last segment have slot ``-1`` and do nothing.
    A slot with no rows (an empty segment) gets no block.
    """
    device = slots_level.device
    tok = slots_level.repeat_interleave(T)  # (M,) slot of each token row
    key = torch.where(tok < 0, torch.full_like(tok, num_slots), tok)  # -1 -> bucket S, sorted last
    order = torch.argsort(key, stable=True).to(torch.int32)  # (M,)
    counts = torch.bincount(key, minlength=num_slots + 1)[:num_slots]  # (S,) rows per slot
    seg_start = torch.cumsum(counts, 0) - counts  # (S,) first position of each segment in `order`
    nblk = (counts + block_m - 1) // block_m  # (S,)
    blk_end = torch.cumsum(nblk, 0)  # (S,)
    max_blocks = (tok.numel() + block_m - 1) // block_m + min(num_slots, slots_level.numel())
    b = torch.arange(max_blocks, device=device)
    seg = torch.searchsorted(blk_end, b, right=True)  # (blocks,) segment (= slot) of each block; S past the end
    live = seg < num_slots
    seg_c = seg.clamp(max=num_slots - 1)
    row0 = seg_start[seg_c] + (b - (blk_end[seg_c] - nblk[seg_c])) * block_m
    row1 = torch.minimum(row0 + block_m, seg_start[seg_c] + counts[seg_c])
    blk_slot = torch.where(live, seg_c, torch.full_like(seg_c, -1)).to(torch.int32)
    row0 = torch.where(live, row0, torch.zeros_like(row0)).to(torch.int32)
    row1 = torch.where(live, row1, torch.zeros_like(row1)).to(torch.int32)
    if device.type != "cuda":  # CPU (the interpreter): a sync is free, and every spare program costs
        n = int(nblk.sum())
        blk_slot, row0, row1 = blk_slot[:n], row0[:n], row1[:n]
    return order, blk_slot, row0, row1


_last_plan: tuple = (None,)  # (weakref to slots, its _version, T, S, BLOCK_M, plans); one entry, swapped atomically


def _plans(slots: Tensor, T: int, num_slots: int, block_m: int) -> list[tuple[Tensor, ...]]:
    """:func:`segment_plan` of every level, reused while the same routing tensor is passed unchanged.

    Every wrapped layer of one forward gets the same ``slots`` object (the host's routing), so the plan is built
    once per forward instead of once per layer. Identity (a live weakref: another tensor, even at the same
    address, never matches) plus ``_version`` (bumped by any in-place write) make reuse safe. Inference tensors
    keep no version counter; ``LoraHost.route`` stores a private copy of the routing, which nobody writes to.
    """
    global _last_plan
    ref, version, *key, plans = _last_plan if _last_plan[0] is not None else (None, None, None, None, None, None)
    now = -1 if slots.is_inference() else slots._version
    if ref is not None and ref() is slots and version == now and key == [T, num_slots, block_m]:
        return plans
    plans = [segment_plan(slots[:, level], T, num_slots, block_m) for level in range(slots.shape[1])]
    _last_plan = (weakref.ref(slots), now, T, num_slots, block_m, plans)
    return plans


def _check(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: Tensor, slots: Tensor) -> None:
    if x.dim() != 3 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"expected x (Bsz, T, in), A (S, r, in), B (S, out, r); got {tuple(x.shape)}, "
                         f"{tuple(A.shape)}, {tuple(B.shape)}")
    if A.shape[2] != x.shape[2] or B.shape[0] != A.shape[0] or B.shape[2] != A.shape[1]:
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    if tuple(y.shape) != (x.shape[0], x.shape[1], B.shape[1]):
        raise ValueError(f"y must be (Bsz, T, out) = {(x.shape[0], x.shape[1], B.shape[1])}, got {tuple(y.shape)}")
    if slots.dim() != 2 or slots.shape[0] != x.shape[0]:
        raise ValueError(f"slots must be (Bsz, L) with Bsz = {x.shape[0]}, got {tuple(slots.shape)}")
    if scaling.shape != (A.shape[0],):
        raise ValueError(f"scaling must be (S,) = ({A.shape[0]},), got {tuple(scaling.shape)}")


# (BLOCK_M, BLOCK_K, BLOCK_N) per path; on CPU (the interpreter) large tiles: its cost is per operation, per program
BLOCKS = {("cuda", "decode"): (1, 128, 64), ("cuda", "prefill"): (64, 64, 64),
          ("cpu", "decode"): (1, 128, 128), ("cpu", "prefill"): (32, 128, 128)}


def lora_add_(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: Tensor, slots: Tensor,
              ranks: Tensor | None = None, *, path: str | None = None,
              blocks: tuple[int, int, int] | None = None) -> Tensor:
    """``y += lora_delta(x, A, B, scaling, slots)`` in place, with the Triton kernels; returns ``y``.

    ``y: (Bsz, T, out)`` (the base output), ``x: (Bsz, T, in)``, ``A: (S, r, in)``, ``B: (S, out, r)``,
    ``scaling: (S,)``, ``slots: (Bsz,)`` or ``(Bsz, L)`` with ``-1`` = none, ``ranks: (S,)`` optional per-slot
    ranks (padding beyond them is not read). ``path``: ``"decode"`` | ``"prefill"`` | None (decode iff T == 1).
    ``blocks``: ``(BLOCK_M, BLOCK_K, BLOCK_N)`` powers of two, default :data:`BLOCKS` (tests use small ones).
    """
    slots = slots.unsqueeze(1) if slots.dim() == 1 else slots  # (Bsz, L)
    _check(y, x, A, B, scaling, slots)
    if not (y.is_contiguous() and x.stride(-1) == 1):
        raise ValueError("lora_add_ needs a contiguous y and x with a unit inner stride")
    Bsz, T, K = x.shape
    S, R, N = A.shape[0], A.shape[1], B.shape[1]
    M, L = Bsz * T, slots.shape[1]
    if M == 0 or L == 0:
        return y
    k = _kernels()
    x2 = x.reshape(M, K)  # (M, in), a view
    y2 = y.view(M, N)  # (M, out)
    slots = slots.to(torch.int64).contiguous()
    has_ranks = ranks is not None
    rank_t = ranks.to(device=x.device, dtype=torch.int32).contiguous() if has_ranks else slots  # dummy if absent
    BLOCK_R = _blocks_r(R)
    path = path or ("decode" if T == 1 else "prefill")
    if path not in ("decode", "prefill"):
        raise ValueError(f"path must be 'decode', 'prefill' or None, got {path!r}")
    BLOCK_M, BLOCK_K, BLOCK_N = blocks or BLOCKS[("cuda" if x.is_cuda else "cpu", path)]
    if path == "decode":
        split = _decode_split(M, L, K, BLOCK_K, x.device)
        k_per = (K + split - 1) // split
        k_per = (k_per + BLOCK_K - 1) // BLOCK_K * BLOCK_K
        split = (K + k_per - 1) // k_per
        h = torch.empty(split, L, M, BLOCK_R, dtype=torch.float32, device=x.device)  # partial shrinks
        k["decode_shrink"][(M, L, split)](
            x2, A, slots, rank_t, h, M, K, T, L, k_per,
            x2.stride(0), A.stride(0), A.stride(1), A.stride(2), h.stride(0), h.stride(1), h.stride(2),
            HAS_RANKS=has_ranks, R=R, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
        k["decode_expand"][(M, k["cdiv"](N, BLOCK_N))](
            y2, B, slots, rank_t, scaling, h, M, N, T, L, split,
            y2.stride(0), B.stride(0), B.stride(1), B.stride(2), h.stride(0), h.stride(1), h.stride(2),
            HAS_RANKS=has_ranks, R=R, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N)
        return y
    # fp32 stays exact (no TF32); bf16/fp16 use tensor cores. The interpreter's tl.dot multiplies bf16's raw bits
    # (triton 3.9), so there the operands are cast to fp32 first: same kernels, inputs already rounded to bf16.
    ieee = x.dtype == torch.float32 or interpreting()
    h = torch.empty(M, BLOCK_R, dtype=torch.float32, device=x.device)  # (M, BLOCK_R), in sorted order
    for order, blk_slot, row0, row1 in _plans(slots, T, S, BLOCK_M):  # one kernel pair per level: levels may
        # hit the same row, so they never run concurrently
        n_blocks = blk_slot.numel()
        k["segment_shrink"][(n_blocks,)](
            x2, A, rank_t, scaling, order, blk_slot, row0, row1, h, K,
            x2.stride(0), A.stride(0), A.stride(1), A.stride(2), h.stride(0),
            HAS_RANKS=has_ranks, R=R, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, IEEE=ieee)
        k["segment_expand"][(n_blocks, k["cdiv"](N, BLOCK_N))](
            y2, B, rank_t, order, blk_slot, row0, row1, h, N,
            y2.stride(0), B.stride(0), B.stride(1), B.stride(2), h.stride(0),
            HAS_RANKS=has_ranks, R=R, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, IEEE=ieee)
    return y


def lora_delta_triton(x: Tensor, A: Tensor, B: Tensor, scaling: Tensor, slots: Tensor,
                      ranks: Tensor | None = None, *, path: str | None = None,
                      blocks: tuple[int, int, int] | None = None) -> Tensor:
    """The operator's delta ``(Bsz, T, out)`` computed by the kernels (into zeros)."""
    y = torch.zeros(x.shape[0], x.shape[1], B.shape[1], dtype=x.dtype, device=x.device)
    return lora_add_(y, x.contiguous(), A, B, scaling, slots, ranks, path=path, blocks=blocks)
