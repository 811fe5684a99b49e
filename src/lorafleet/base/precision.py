r"""The shared base's precision: ``native``, ``int4``, ``int8``, ``bf16`` or ``fp32`` (the numerical reference).

``fp32`` is the loader's plain path: every weight dequantized to float32. The other choices replace each
``nn.Linear`` of the transformer blocks with a frozen :class:`QuantLinear` (and the token embedding / the tied
``lm_head`` with :class:`QuantEmbedding` / an int8 :class:`QuantLinear`):

=========  ===============================================================================================
``auto``   the default: ``native`` where the base can run it (a Q4_1/Q8_0 GGUF on the CPU, e.g. SmolLM2), else
           ``fp32`` (float directories, Gemma's Q4_K_M GGUF, a GPU). The chosen one is shown as ``auto (native)``.
``native`` GGUF bases keep the shipped quantization. Q4_1 blocks (32 weights, fp16 scale ``d`` and min ``m``,
           ``w = q*d + m``) run as torch's group-wise int4 op with the file's own 4-bit codes — no
           re-quantization. The op computes ``w = (q - 8)*scale + zero``, so ``scale = d`` and
           ``zero = m + 8d``; the op keeps scale and zero in bfloat16, so ``d`` and ``m + 8d`` are rounded to
           bf16 (the only deviation from the file: < 2^-9 relative per group, measured in the tests).
           Q8_0 tensors (SmolLM2's token embedding, tied to ``lm_head``) have per-32 scales the int8 op cannot
           take; they are re-quantized per row to int8 (documented, not exact). F32 tensors stay float32.
           Any other GGUF type (Q4_K, Q6_K, … e.g. Gemma's Q4_K_M) → :class:`BasePrecisionError`: use int4.
           A tiny or Hugging Face directory base ships float weights: ``native`` means ``fp32`` there, and
           :meth:`lorafleet.base.BaseModel.info` says so (``native (fp32)``).
``int4``   any base, quantized at load: group-wise (32) asymmetric 4-bit from the fp32 weights (re-quantization
           error on a GGUF, measured by ``benchmarks/base_precision.py``); embedding / lm_head int8 per row.
``int8``   any base, weight-only int8 per output channel (``torch.ops.aten._weight_int8pack_mm``).
``bf16``   bfloat16 weights, bfloat16 matmul for small batches.
``fp32``   today's path.
=========  ===============================================================================================

Activations, norms, the residual stream, LoRA deltas (the one operator) and the KV cache stay float32: each
:class:`QuantLinear` takes and returns float32 and converts to bf16 only around the op. Batches of more than
:data:`OP_MAX_ROWS` rows (per kind) run a bf16 GEMM over the weight dequantized on the fly in bf16 (transient, not
cached; bf16 activations and a bf16-rounded result as the op, so the two paths agree within one bf16 ulp): torch's
CPU int4/int8 kernels are built for decode-sized batches and lose to the bf16 GEMM beyond that (measured, see
``docs/results/base_precision.md``).

Training over a low-precision base works QLoRA-style: :class:`QuantLinear`'s backward computes the input
gradient through the dequantized weight and gives the frozen weight no gradient.

The packed weights are rebuilt from the GGUF (or the fp32 weights) at each load, verified against the fp32
reference before anything is replaced; there is no quantized cache file. A damaged GGUF block (wrong size,
non-finite scale, codes that disagree with the verified fp32 cache) is a :class:`BasePrecisionError` and the
model is left untouched.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor, nn

from lorafleet.errors import LorafleetError

PRECISIONS = ("auto", "native", "int4", "int8", "bf16", "fp32")
ENV_VAR = "LORAFLEET_BASE_DTYPE"
DEFAULT_PRECISION = "auto"  # native where the base can run it (CPU, a Q4_1/Q8_0 GGUF), else fp32
GROUP = 32  # int4 group size along the input dimension (Q4_1's block)
# At most this many rows (tokens) per call go through torch's int4/int8 op; more rows take a bf16 GEMM over the
# weight dequantized on the fly in bf16 (bf16 weights always take the bf16 GEMM). Measured on this 2-core AVX-512
# machine (2 threads): the ops lead up to ~128 rows (SmolLM2's 576x3072 at 64 rows: op 0.65 ms, dequant + bf16 GEMM
# 2.7 ms) and lose from ~256 on.
OP_MAX_ROWS = {"int4": 128, "int8": 128}

# GGUF tensor names of a llama block -> the transformers module path under model.layers.{i}.
_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class BasePrecisionError(LorafleetError, ValueError):
    """The requested base precision is unknown, or the base cannot run at it."""


def resolve_precision(value: str | None) -> str:
    """``value``, else ``$LORAFLEET_BASE_DTYPE``, else :data:`DEFAULT_PRECISION`; checked against the choices."""
    raw = value if value is not None else os.environ.get(ENV_VAR) or DEFAULT_PRECISION
    name = str(raw).strip().lower()
    if name not in PRECISIONS:
        where = f" (from ${ENV_VAR})" if value is None else ""
        raise BasePrecisionError(f"unknown base precision {raw!r}{where}; choose one of: {', '.join(PRECISIONS)}")
    return name


def _bf16_round(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


# ------------------------------------------------------------------------------------------------ the modules


class _QuantMatmul(torch.autograd.Function):
    """``y = x @ W.T`` for a frozen quantized ``W``; backward gives ``x`` its gradient through the dequantized W."""

    @staticmethod
    def forward(ctx, x2d: Tensor, layer: QuantLinear) -> Tensor:
        ctx.layer = layer
        return layer._matmul(x2d)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w = ctx.layer.dequantize(torch.bfloat16)  # (out, in), transient: a bf16 GEMM as in the forward
        return (grad.to(torch.bfloat16) @ w).to(grad.dtype), None


def _blocked(block: int, k_pairs: bool):
    """A decoder of torch's CPU int4 pack with rows in blocks of ``block``: byte ``[b, col, i]`` holds row
    ``block*b + i`` (low nibble) and ``block*b + block/2 + i`` (high nibble); ``k_pairs``: the AVX2 variant, whose
    bytes go over column pairs ``[b, col/2, col%2, i]``."""
    half = block // 2

    def decode(packed: Tensor, n: int, k: int) -> Tensor:
        if k_pairs:
            p = packed.reshape(n // block, k // 2, 2, half)
            codes = torch.stack((p & 15, p >> 4), dim=1)  # (n/B, 2, k/2, 2, B/2)
            return codes.permute(0, 1, 4, 2, 3).reshape(n, k)
        p = packed.reshape(n // block, k, half)
        codes = torch.stack((p & 15, p >> 4), dim=1)  # (n/B, 2, k, B/2)
        return codes.permute(0, 1, 3, 2).reshape(n, k)

    return decode


_INT4_CANDIDATES = (_blocked(64, False), _blocked(32, True))  # AVX-512 and AVX2 layouts (torch 2.13)
_INT4_DECODERS: dict[tuple[int, int], object] = {}


def _int4_layout(n: int, k: int) -> Tensor:
    """For torch's CPU int4 pack of an ``(n, k)`` code matrix: the flat ``(n*k)`` position of the code held by each
    nibble of the packed bytes (low nibble first), found by packing codes that spell each position's index in base
    16, one hex digit per pack. Works for any layout; slower to apply than a structural decoder."""
    index = torch.arange(n * k, dtype=torch.int64)
    layout = torch.zeros(n * k, dtype=torch.int64)
    digit = 0
    while (n * k - 1) >> (4 * digit):
        codes = ((index >> (4 * digit)) & 15).view(n, k).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).view(torch.uint8).reshape(-1)
        layout |= torch.stack((packed & 15, packed >> 4), dim=-1).reshape(-1).to(torch.int64) << (4 * digit)
        digit += 1
    return layout


def _int4_decoder(n: int, k: int):
    """How to unpack this shape's codes. The pack layout is the kernel's private choice and differs by CPU (row
    blocks of 64 with AVX-512, 32 without), so it is probed once per shape: the first structural decoder that
    reads a random pack back exactly, else the position map of :func:`_int4_layout`. Cached per shape."""
    decoder = _INT4_DECODERS.get((n, k))
    if decoder is None:
        probe = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(n * 7919 + k))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).view(torch.uint8)
        for candidate in _INT4_CANDIDATES:
            try:
                if torch.equal(candidate(packed, n, k).to(torch.int32), probe):
                    decoder = candidate
                    break
            except RuntimeError:  # the shape does not tile this candidate's blocks
                continue
        if decoder is None:
            layout = _int4_layout(n, k)

            def decoder(packed: Tensor, n: int, k: int, layout: Tensor = layout) -> Tensor:
                flat = packed.reshape(-1)
                codes = torch.empty(n * k, dtype=torch.uint8)
                codes[layout] = torch.stack((flat & 15, flat >> 4), dim=-1).reshape(-1)
                return codes.view(n, k)

        _INT4_DECODERS[(n, k)] = decoder
    return decoder


def _unpack_int4(packed: Tensor, n: int, k: int) -> Tensor:
    """Codes ``(n, k)`` uint8 in 0..15 from torch's CPU int4 pack (see :func:`_int4_decoder`)."""
    return _int4_decoder(n, k)(packed.contiguous().view(torch.uint8), n, k)


class QuantLinear(nn.Module):
    """A frozen linear whose weight is int4 (group-wise), int8 (per channel) or bf16; float32 in and out.

    Holds buffers only (no parameters): nothing to train, nothing for an optimizer to find.
    """

    frozen_base_linear = True  # the one operator (adapters/operator.py) wraps it like an nn.Linear

    def __init__(self, kind: str, in_features: int, out_features: int, bias: Tensor | None = None) -> None:
        super().__init__()
        if kind not in ("int4", "int8", "bf16"):
            raise BasePrecisionError(f"QuantLinear kind must be int4, int8 or bf16, got {kind!r}")
        self.kind, self.in_features, self.out_features = kind, in_features, out_features
        self.note = kind  # how the weight got here (shown by BaseModel.info)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    # -- construction ----------------------------------------------------------------------------------------

    @classmethod
    def _int4(cls, codes: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None, note: str) -> QuantLinear:
        """``codes: (n, k)`` ints 0..15, ``scale``/``zero``: ``(n, k/GROUP)``, ``w = (q - 8)*scale + zero``."""
        n, k = codes.shape
        if n % 32 or k % GROUP:
            raise BasePrecisionError(f"int4 needs out_features % 32 == 0 and in_features % {GROUP} == 0, got {n}x{k}")
        layer = cls("int4", k, n, bias)
        layer.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
        sz = torch.stack((scale.t(), zero.t()), dim=-1)  # (k/G, n, 2)
        layer.register_buffer("scales_zeros", sz.to(torch.bfloat16).contiguous())
        layer.note = note
        return layer

    @classmethod
    def from_q4_1(cls, codes: Tensor, d: Tensor, m: Tensor, bias: Tensor | None = None) -> QuantLinear:
        """Q4_1 blocks as shipped: ``codes (n, k)`` 0..15, ``d``/``m`` ``(n, k/32)`` with ``w = q*d + m``."""
        d, m = d.float(), m.float()
        return cls._int4(codes, d, m + 8.0 * d, bias, "int4 (Q4_1 codes as shipped)")

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str) -> QuantLinear:
        """Quantize a float linear at load (``int4``: group-wise asymmetric, ``int8``: per channel, ``bf16``)."""
        w = linear.weight.detach().float()
        bias = linear.bias
        n, k = w.shape
        if kind == "int4":
            if k % GROUP or n % 32:
                raise BasePrecisionError(f"int4 needs in_features % {GROUP} == 0 and out_features % 32 == 0, "
                                         f"got a {n}x{k} weight")
            g = w.view(n, k // GROUP, GROUP)
            lo, hi = g.amin(-1), g.amax(-1)
            scale = _bf16_round(((hi - lo) / 15.0).clamp_min(1e-8))
            zero = _bf16_round(lo + 8.0 * scale)
            codes = torch.round((g - zero[..., None]) / scale[..., None] + 8.0).clamp_(0, 15).view(n, k)
            return cls._int4(codes, scale, zero, bias, "int4 (quantized at load, group 32)")
        if kind == "int8":
            return cls._int8(w, bias, "int8 (quantized at load, per channel)")
        if kind == "bf16":
            layer = cls("bf16", k, n, bias)
            layer.register_buffer("weight_bf16", w.to(torch.bfloat16).contiguous())
            return layer
        raise BasePrecisionError(f"cannot build a {kind!r} QuantLinear")

    @classmethod
    def _int8(cls, w: Tensor, bias: Tensor | None, note: str, *, q: Tensor | None = None,
              scale: Tensor | None = None) -> QuantLinear:
        n, k = w.shape if q is None else q.shape
        layer = cls("int8", k, n, bias)
        if q is None:
            q, scale = quantize_int8_rows(w)
        layer.register_buffer("qweight", q)  # (n, k) int8
        layer.register_buffer("scale", scale)  # (n,) float32, bf16-representable
        layer.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        layer.note = note
        return layer

    @staticmethod
    def cannot_fuse(layers: list) -> str | None:
        """Why :meth:`fuse` cannot take ``layers`` (None: it can)."""
        first = layers[0] if layers else None
        if len(layers) < 2 or any(not isinstance(m, QuantLinear) or m.kind != first.kind
                                  or m.in_features != first.in_features for m in layers):
            return "needs >= 2 QuantLinears of one kind and one in_features"
        if first.kind == "int4" and any(m.out_features % 64 for m in layers[:-1]):
            # torch's CPU int4 pack lays rows out in blocks of 64: only then are the parts' codes rows of the whole
            return "int4 parts (all but the last) need out_features % 64 == 0"
        return None

    @classmethod
    @torch.no_grad()
    def fuse(cls, layers: list[QuantLinear]) -> QuantLinear:
        """One layer computing ``cat([l(x) for l in layers], -1)`` with one kernel call (e.g. q/k/v, gate/up).

        The fused layer holds the concatenated codes and each source layer's codes become a view of them, so the
        codes are not stored twice; the int4 scales (which the op needs contiguous) and biases are copied.
        """
        why = cls.cannot_fuse(layers)
        if why:
            raise BasePrecisionError(f"QuantLinear.fuse: {why}")
        first = layers[0]
        sizes = [m.out_features for m in layers]
        bias = None
        if any(m.bias is not None for m in layers):
            bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in layers])
        fused = cls(first.kind, first.in_features, sum(sizes), bias)
        fused.note = f"{first.note}, fused x{len(layers)}"
        shared = {"int4": ("packed",), "int8": ("qweight", "scale", "scale_bf16"), "bf16": ("weight_bf16",)}[first.kind]
        for name in shared:
            fused.register_buffer(name, torch.cat([getattr(m, name) for m in layers]))
            offset = 0
            for m, n in zip(layers, sizes, strict=True):
                setattr(m, name, getattr(fused, name)[offset:offset + n])  # a view: the codes live once
                offset += n
        if first.kind == "int4":
            fused.register_buffer("scales_zeros", torch.cat([m.scales_zeros for m in layers], dim=1).contiguous())
        return fused

    # -- math ------------------------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "scale_bf16")

    def numel(self) -> int:
        return self.in_features * self.out_features + (0 if self.bias is None else self.bias.numel())

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight ``(out, in)`` exactly as the op sees it, computed in float32 and returned in ``dtype``."""
        n, k = self.out_features, self.in_features
        if self.kind == "int4":
            q = _unpack_int4(self.packed, n, k).view(n, k // GROUP, GROUP)
            sz = self.scales_zeros.permute(1, 0, 2).float()  # (n, k/G, 2): scale, zero per group
            scale = sz[..., 0:1]
            zero = sz[..., 1:2] - 8.0 * scale  # (q - 8)*scale + zero, with the -8 folded (exact: see the tests)
            return q.float().mul_(scale).add_(zero).view(n, k).to(dtype)
        if self.kind == "int8":
            return (self.qweight.float() * self.scale[:, None]).to(dtype)
        return self.weight_bf16.to(dtype)

    def _matmul(self, x2d: Tensor) -> Tensor:
        xb = x2d.to(torch.bfloat16)
        if self.kind == "bf16":
            y = xb @ self.weight_bf16.t()
        elif x2d.shape[0] > OP_MAX_ROWS[self.kind]:
            # a bf16 GEMM (AVX-512 BF16, fp32 accumulation, a bf16 result like the op's) over the weight dequantized
            # on the fly in bf16: ~5x the fp32 GEMM over the fp32 dequantized weight on this CPU at 512 rows
            y = xb @ self.dequantize(torch.bfloat16).t()
        elif self.kind == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, GROUP, self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int8pack_mm(xb, self.qweight, self.scale_bf16)
        return y.to(x2d.dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.dtype != torch.float32:
            x2d = x2d.float()
        y = _QuantMatmul.apply(x2d, self) if torch.is_grad_enabled() and x2d.requires_grad else self._matmul(x2d)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.note}"


def quantize_int8_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: ``w ≈ q * scale[:, None]``, ``scale`` rounded up to a bf16 value (the op's dtype)."""
    w = w.float()
    amax = w.abs().amax(dim=1).clamp_min(1e-8)
    scale = (amax / 127.0).to(torch.bfloat16).float()
    scale = torch.where(scale * 127.0 < amax, torch.nextafter(scale.to(torch.bfloat16), torch.tensor(
        math.inf, dtype=torch.bfloat16)).float(), scale)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class QuantEmbedding(nn.Module):
    """A frozen token embedding held as int8 per row (``w = q * scale``) or bf16; looks up float32 rows."""

    def __init__(self, weight: Tensor, kind: str, padding_idx: int | None = None) -> None:
        super().__init__()
        self.kind, self.padding_idx = kind, padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape
        if kind == "int8":
            q, scale = quantize_int8_rows(weight)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
        elif kind == "bf16":
            self.register_buffer("weight_bf16", weight.detach().to(torch.bfloat16).contiguous())
        else:
            raise BasePrecisionError(f"QuantEmbedding kind must be int8 or bf16, got {kind!r}")

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def numel(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        if self.kind == "int8":
            return self.qweight[ids].float() * self.scale[ids].unsqueeze(-1)
        return self.weight_bf16[ids].float()

    def as_linear(self, note: str) -> QuantLinear:
        """The tied ``lm_head``: the same storage read as a linear (no copy)."""
        if self.kind == "int8":
            return QuantLinear._int8(None, None, note, q=self.qweight, scale=self.scale)
        layer = QuantLinear("bf16", self.embedding_dim, self.num_embeddings)
        layer.register_buffer("weight_bf16", self.weight_bf16)
        layer.note = note
        return layer

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.kind}"


# ------------------------------------------------------------------------------------------------ GGUF blocks

_Q4_1_BLOCK = 20  # bytes: fp16 d, fp16 m, 16 bytes of nibbles (weights j and j+16 share byte j)


def q4_1_blocks(raw: np.ndarray, n: int, k: int, name: str = "tensor") -> tuple[Tensor, Tensor, Tensor]:
    """Decode Q4_1 data of an ``(n, k)`` weight: ``codes (n, k)`` uint8, ``d``/``m`` ``(n, k/32)`` float32."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    want = n * (k // 32) * _Q4_1_BLOCK
    if k % 32 or raw.size != want:
        raise BasePrecisionError(f"GGUF tensor {name}: Q4_1 data of {raw.size} bytes, expected {want} for {n}x{k}; "
                                 "the file is damaged or truncated")
    blocks = raw.reshape(n, k // 32, _Q4_1_BLOCK)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    if not (torch.isfinite(d).all() and torch.isfinite(m).all()):
        raise BasePrecisionError(f"GGUF tensor {name}: non-finite Q4_1 scales; the file is damaged")
    qs = torch.from_numpy(blocks[..., 4:].copy())  # (n, k/32, 16)
    codes = torch.cat((qs & 15, qs >> 4), dim=-1).reshape(n, k)
    return codes, d, m


def _reverse_permute_rows(n: int, n_head: int) -> np.ndarray:
    """Row order transformers applies to llama q/k weights read from a GGUF (undoing llama.cpp's rotary permute)."""
    dim = n // n_head // 2
    return np.arange(n).reshape(n_head, dim, 2).swapaxes(2, 1).reshape(n)


def _gguf_tensors(path) -> dict:
    try:
        import gguf  # noqa: PLC0415 - only for native GGUF loads
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a damaged or foreign file
        raise BasePrecisionError(f"cannot read the GGUF {path} for native precision: {exc}") from exc
    return {t.name: t for t in reader.tensors}


# ------------------------------------------------------------------------------------------------ applying


def _block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if ".layers." in name and isinstance(m, nn.Linear)}


def _hf_to_gguf_name(name: str) -> str | None:
    # model.layers.{i}.self_attn.q_proj -> blk.{i}.attn_q.weight
    head, sep, tail = name.partition(".layers.")
    if not sep:
        return None
    idx, _, rest = tail.partition(".")
    for g, hf in _GGUF_TO_HF.items():
        if rest == hf:
            return f"blk.{idx}.{g}.weight"
    return None


NATIVE_GGUF_TYPES = frozenset({"Q4_1", "Q8_0", "F32", "F16", "BF16"})  # the GGUF block types native runs


def _native_gguf_linears(model: nn.Module, path, linears: dict[str, nn.Linear], tensors: dict | None = None
                         ) -> dict[str, nn.Module]:
    tensors = _gguf_tensors(path) if tensors is None else tensors
    cfg = model.config
    out: dict[str, nn.Module] = {}
    unsupported: dict[str, str] = {}
    for name, lin in linears.items():
        gname = _hf_to_gguf_name(name)
        t = tensors.get(gname) if gname else None
        if t is None:
            raise BasePrecisionError(f"native precision: no GGUF tensor for {name} (looked for {gname!r})")
        kind = t.tensor_type.name
        n, k = lin.out_features, lin.in_features
        if kind == "Q4_1":
            codes, d, m = q4_1_blocks(t.data, n, k, gname)
            if name.endswith("q_proj") or name.endswith("k_proj"):
                heads = cfg.num_attention_heads if name.endswith("q_proj") else cfg.num_key_value_heads
                perm = torch.from_numpy(_reverse_permute_rows(n, heads))
                codes, d, m = codes[perm], d[perm], m[perm]
            # the verified fp32 weights are these same blocks dequantized: a mismatch means damage or a mapping bug
            ref = lin.weight.detach()
            exact = (codes.float().view(n, k // 32, 32) * d[..., None] + m[..., None]).view(n, k)
            err = float((exact - ref).abs().max())
            if not err <= 1e-6 * max(1.0, float(ref.abs().max())):
                raise BasePrecisionError(f"GGUF tensor {gname}: its Q4_1 blocks disagree with the verified base "
                                         f"weights (max diff {err:.3g}); the GGUF or the base cache is damaged")
            out[name] = QuantLinear.from_q4_1(codes, d, m, lin.bias)
        elif kind == "Q8_0":
            out[name] = QuantLinear._int8(lin.weight.detach(), lin.bias, "int8 (Q8_0 re-quantized per channel)")
        elif kind in NATIVE_GGUF_TYPES:  # F32 / F16 / BF16
            continue  # float tensors stay as the loader made them (fp32)
        else:
            unsupported[gname] = kind
    if unsupported:
        kinds = ", ".join(sorted(set(unsupported.values())))
        raise BasePrecisionError(f"native precision runs Q4_1 (int4) and Q8_0 (int8) GGUF tensors; this base ships "
                                 f"{kinds} (e.g. {next(iter(unsupported))}): choose one of int4, int8, bf16, fp32")
    return out


def auto_native_reason(source_kind: str, source_path, device: str | torch.device = "cpu", *,
                       tensors: dict | None = None) -> str | None:
    """Why ``auto`` does not take ``native`` for this base (None: it does). ``native`` runs torch's CPU int4/int8
    ops over a GGUF's own Q4_1/Q8_0 blocks; anything else (a float directory, other GGUF types such as Gemma's
    Q4_K_M, a GPU) keeps the fp32 reference under ``auto`` — ask for int4/int8/bf16 explicitly there.
    ``tensors``: the GGUF's tensors where the caller has read them already."""
    if torch.device(device).type != "cpu":
        return f"native runs on the CPU only (device {device})"
    if source_kind != "gguf":
        return f"a {source_kind} base ships float weights"
    tensors = _gguf_tensors(source_path) if tensors is None else tensors
    other = sorted({t.tensor_type.name for name, t in tensors.items()
                    if name.startswith("blk.") and name.endswith(".weight") and any(f".{g}." in name for g in _GGUF_TO_HF)
                    and t.tensor_type.name not in NATIVE_GGUF_TYPES})
    return f"its block weights include {', '.join(other)}" if other else None


def apply_precision(model: nn.Module, precision: str, *, source_kind: str, source_path=None,
                    device: str | torch.device = "cpu") -> dict:
    """Replace the base's linears (and embedding / lm_head) for ``precision``; returns what was done.

    All replacements are built first and swapped in only when every one succeeded: an error leaves ``model``
    as it was.
    """
    precision = resolve_precision(precision)
    effective = precision
    tensors = None  # a GGUF's tensors, read once for auto's check and native's blocks
    if precision == "auto":  # the default: the fastest precision that passes the correctness tests, where it can run
        if source_kind == "gguf" and torch.device(device).type == "cpu":
            tensors = _gguf_tensors(source_path)
        effective = "native" if auto_native_reason(source_kind, source_path, device, tensors=tensors) is None else "fp32"
    if effective == "native" and source_kind != "gguf":
        effective = "fp32"  # tiny / HF directories ship float weights: native is their float32 path
    summary = {"precision": precision, "effective": effective, "modules": {}, "weight_bytes": None}
    if effective == "fp32":
        summary["weight_bytes"] = _weight_bytes(model)
        return summary
    if torch.device(device).type != "cpu" and effective in ("native", "int4", "int8"):
        raise BasePrecisionError(f"base precision {precision!r} runs on the CPU only (torch's int4/int8 ops); "
                                 f"on {device} choose bf16 or fp32")
    linears = _block_linears(model)
    if effective == "native":
        new = _native_gguf_linears(model, source_path, linears, tensors)
    else:
        new = {name: QuantLinear.from_linear(lin, effective) for name, lin in linears.items()}
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and isinstance(emb, nn.Embedding) and head.weight is emb.weight
    emb_kind = "bf16" if effective == "bf16" else "int8"
    new_emb = QuantEmbedding(emb.weight.detach(), emb_kind, emb.padding_idx) if isinstance(emb, nn.Embedding) else None
    note = ("int8 (Q8_0 re-quantized per row)" if effective == "native" else f"{emb_kind} (per row)")
    new_head = None
    if head is not None and isinstance(head, nn.Linear):
        if tied and new_emb is not None:
            new_head = new_emb.as_linear(f"{note}, tied to the embedding")
        else:
            new_head = (QuantLinear._int8(head.weight.detach(), head.bias, f"int8 ({note})") if emb_kind == "int8"
                        else QuantLinear.from_linear(head, "bf16"))
    # swap (nothing above touched the model)
    for name, module in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    if new_emb is not None:
        model.set_input_embeddings(new_emb)
    if new_head is not None:
        model.set_output_embeddings(new_head)
    counts: dict[str, int] = {}
    for module in new.values():
        counts[module.note] = counts.get(module.note, 0) + 1
    if new_emb is not None:
        counts[f"embedding {note}"] = 1
    if new_head is not None:
        counts[f"lm_head {new_head.note}"] = 1
    summary["modules"] = counts
    summary["weight_bytes"] = _weight_bytes(model)
    return summary


def _weight_bytes(model: nn.Module) -> int:
    """Resident bytes of the base's weights (parameters and buffers, shared storage counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def logical_numel(model: nn.Module) -> int:
    """Parameters the base computes with: float parameters plus every quantized module's weight, once each."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            key = next(iter(m.buffers())).data_ptr()
            if key not in seen:
                seen.add(key)
                total += m.numel()
    return total
