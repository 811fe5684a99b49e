r"""The lean decode step: one token per row through a Llama-family base with as few tensor ops as it takes.

A batch-1 decode step of a small base is dominated by per-op overhead, not by the weight kernels: on this CPU
SmolLM2-135M's 211 projections at native int4 take ~3 ms per token, while transformers' generic forward spent
~35 ms on ~1,000 small ops around them (mask building, dtype casts, views, module hooks, the cache interface).
:class:`LeanDecoder` runs the same math for a one-token step of every row straight over the model's own modules::

    x = embed(ids)                                         # (n, H) the residual stream, the base's float dtype
    for each layer:
        h = rms_norm(x)                                    # one fused op
        q, k, v = q_proj(h), k_proj(h), v_proj(h)          # the operator's MultiLoraLinear: base + per-row LoRA
        q, k = rope(q), rope(k)                            # the model's own rotary table at each row's position
        K, V = slab.write(layer, k, v)                     # in place; returns the attended window (views)
        a = softmax(q Kᵀ·scale + mask) V                   # two bmm per (row, kv head): GQA without repeating K/V
        x = x + o_proj(a)
        h = rms_norm(x)
        x = x + down_proj(silu(gate_proj(h)) * up_proj(h))
    logits = lm_head(rms_norm(x))                          # (n, V)

Every projection is still the one operator (``adapters/operator.py``): adapters, stacks and a low-precision
base work exactly as in the full forward. The result equals transformers' forward on the same inputs to float
rounding (``tests/serving/test_lean.py`` checks logits and greedy tokens, every precision, mixed batches).

Only architectures whose decoder layer is exactly this are taken (:data:`SUPPORTED`); anything else (Gemma's
scaled norms and q/k norms, sliding windows, biases on norms, other activations) keeps the full forward, with
the reason given by :func:`unsupported_reason`. Prefill (many tokens per row) always takes the full forward:
it is bound by the weight GEMMs, not by op overhead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafleet.adapters import LoraHost
from lorafleet.base.precision import QuantLinear

SUPPORTED = frozenset({"llama"})  # model_type values whose decoder layer is the one above


def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot take the lean step (None: it can)."""
    cfg = _text_config(model)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        return f"model_type {kind!r} is not one of {sorted(SUPPORTED)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} is not silu"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "the model has no .model.layers / .model.rotary_emb"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "tensor-parallel pretraining slices (pretraining_tp > 1)"
    return None


class _Fused:
    """Several projections of one input (q/k/v, gate/up): the base part in one kernel call where the base is a
    low-precision one (:meth:`QuantLinear.fuse`), then each projection's LoRA rows through the operator."""

    def __init__(self, projections: list) -> None:
        self.projections = projections
        bases = [getattr(p, "base", p) for p in projections]
        self.kernel = None if QuantLinear.cannot_fuse(bases) else QuantLinear.fuse(bases)
        self.bounds = []
        offset = 0
        for b in bases:
            self.bounds.append((offset, offset + b.out_features))
            offset += b.out_features

    @property
    def extra_bytes(self) -> int:
        """Bytes the fused layer adds (its int4 scales and biases: the codes are shared with the projections)."""
        if self.kernel is None:
            return 0
        return sum(b.numel() * b.element_size() for name, b in self.kernel.named_buffers()
                   if name in ("scales_zeros", "bias"))

    def __call__(self, h: Tensor) -> list[Tensor]:
        if self.kernel is None:
            return [p(h) for p in self.projections]
        y = self.kernel(h)
        return [p.add_delta(h, y[:, a:b]) if hasattr(p, "add_delta") else y[:, a:b]
                for p, (a, b) in zip(self.projections, self.bounds, strict=True)]


class LeanDecoder:
    """A one-token-per-row forward over a Llama-family model's modules; see the module docstring."""

    @classmethod
    def of(cls, model: nn.Module) -> LeanDecoder:
        """The model's lean decoder, built once (its fused kernels share the projections' codes)."""
        lean = model.__dict__.get("_lorafleet_lean")
        if lean is None:
            LoraHost.attach(model)  # the projections it keeps must be the operator's wrappers, never the bare linears
            lean = cls(model)
            model.__dict__["_lorafleet_lean"] = lean  # a plain attribute: not a submodule, not in state_dict
        return lean

    def __init__(self, model: nn.Module) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the lean decode step cannot run this base: {reason}")
        cfg = _text_config(model)
        inner = model.model
        self.model = model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        self.final_norm = (inner.norm.weight, float(inner.norm.variance_epsilon))
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.q_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.group = self.q_heads // self.kv_heads
        self.scale = self.head_dim ** -0.5
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon),
                _Fused([attn.q_proj, attn.k_proj, attn.v_proj]), attn.o_proj,
                layer.post_attention_layernorm.weight, float(layer.post_attention_layernorm.variance_epsilon),
                _Fused([mlp.gate_proj, mlp.up_proj]), mlp.down_proj,
            ))
        self.hidden = cfg.hidden_size
        self.extra_bytes = sum(f.extra_bytes for layer in self.layers for f in (layer[2], layer[6]))

    @staticmethod
    def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x: (n, heads, D)`` rotated at each row's position (``cos``/``sin``: ``(n, 1, D)``), as transformers."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def __call__(self, ids: Tensor, positions: Tensor, mask: Tensor, slab) -> Tensor:
        """Logits ``(n, V)`` of one step: ``ids (n,)`` the rows' last tokens, ``positions (n, 1)``, ``mask (n, 1,
        1, W)`` bool over the attended window of ``slab`` (a :class:`~lorafleet.serving.kv.KVSlab` prepared by
        ``begin_decode``: each layer's new key/value is written at its decode column)."""
        n, d, hk, hq = ids.shape[0], self.head_dim, self.kv_heads, self.q_heads
        hidden = (self.hidden,)
        x = self.embed(ids)  # (n, H)
        cos, sin = self.rotary(x, positions)  # (n, 1, D) each
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        width = mask.shape[-1]
        # attention as two bmm over (row, kv head) pairs, the mask as an additive bias built once per step: at these
        # sizes (a few keys per head) this is several times faster than sdpa's CPU kernel with a boolean mask
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        bias = bias.expand(n, hk, self.group, width).reshape(n * hk, self.group, width)
        for i, (w1, e1, qkv, o_proj, w2, e2, gate_up, down) in enumerate(self.layers):
            h = F.rms_norm(x, hidden, w1, e1)
            q, k, v = qkv(h)
            q = self._rope(q.reshape(n, hq, d), cos, sin)
            k = self._rope(k.reshape(n, hk, d), cos, sin)
            keys, values = slab.write(i, k.view(n, hk, 1, d), v.reshape(n, hk, 1, d))  # (n, hk, W, D)
            scores = torch.baddbmm(bias, q.view(n * hk, self.group, d), keys.reshape(n * hk, width, d).transpose(1, 2),
                                   alpha=self.scale)  # (n*hk, group, W)
            a = torch.bmm(torch.softmax(scores, dim=-1), values.reshape(n * hk, width, d))  # (n*hk, group, D)
            x = x + o_proj(a.reshape(n, hq * d))
            h = F.rms_norm(x, hidden, w2, e2)
            gate, up = gate_up(h)
            x = x + down(F.silu(gate) * up)
        return self.lm_head(F.rms_norm(x, hidden, *self.final_norm))
