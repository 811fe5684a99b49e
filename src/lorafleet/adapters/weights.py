"""A LoRA adapter's weights: create (standard init), count, and load into the operator's slot tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lorafleet.adapters.errors import AdapterError
from lorafleet.adapters.spec import LoraSpec

BYTES_PER_DTYPE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
# An adapter's delta ||scaling * B @ A||_F may be at most this many times its base layer's ||W||_F. Real adapters
# sit far below 1 (a fine-tune nudges a layer); the tests' deliberately strong random adapters reach ~60. Above
# 1000 the weights are corrupt or mis-scaled, and finite-but-huge values overflow the forward pass to NaN.
MAX_DELTA_RATIO = 1000.0


def _dense_weight(linear) -> torch.Tensor:
    """The weight of a base linear: ``nn.Linear.weight``, or a quantized layer's dequantized weight (a layer of a
    low-precision base exposes ``dequantize()``; see lorafleet.base.precision.QuantLinear)."""
    dequantize = getattr(linear, "dequantize", None)
    return dequantize() if dequantize is not None else linear.weight


def base_weight_norms(base) -> dict[str, float]:
    """``||W||_F`` of every targetable linear of ``base`` (frozen: computed once per base object)."""
    cached = base.__dict__.get("_lorafleet_weight_norms")
    if cached is None:
        with torch.no_grad():
            cached = {n: float(_dense_weight(lin).detach().double().norm()) for n, lin in base.linear_modules().items()}
        base.__dict__["_lorafleet_weight_norms"] = cached
    return cached


@dataclass
class LoraAdapter:
    """``weights[module] = (A: (r, in), B: (out, r))``; ``module`` is the base's module name,
    e.g. ``model.layers.0.self_attn.q_proj``."""

    spec: LoraSpec
    weights: dict[str, tuple[Tensor, Tensor]]
    base_name: str | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def create(cls, base, spec: LoraSpec, *, seed: int = 0, init: str = "standard") -> LoraAdapter:
        """A new adapter for ``base`` (a :class:`~lorafleet.base.BaseModel`).

        ``init="standard"`` is PEFT's: A ~ Kaiming-uniform(a=sqrt(5)), B = 0, so the adapter starts as the
        base. ``init="random"`` also draws B (small Gaussian) — a visibly different model, for tests/demos.
        """
        if init not in ("standard", "random"):
            raise AdapterError(f"init must be 'standard' or 'random', got {init!r}")
        gen = torch.Generator().manual_seed(seed)
        weights = {}
        for name, linear in sorted(base.linear_modules().items()):
            if name.rsplit(".", 1)[-1] not in spec.target_modules:
                continue
            A = torch.empty(spec.rank, linear.in_features)
            bound = 1.0 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
            A.uniform_(-bound, bound, generator=gen)
            B = torch.zeros(linear.out_features, spec.rank)
            if init == "random":
                B.normal_(0.0, 0.02, generator=gen)
            weights[name] = (A, B)
        if not weights:
            raise AdapterError(f"base {base.name!r} has none of the target modules {list(spec.target_modules)}")
        return cls(spec=spec, weights=weights, base_name=base.name)

    @property
    def num_parameters(self) -> int:
        return sum(A.numel() + B.numel() for A, B in self.weights.values())

    @property
    def num_bytes(self) -> int:
        return sum(A.numel() * BYTES_PER_DTYPE.get(A.dtype, 4) + B.numel() * BYTES_PER_DTYPE.get(B.dtype, 4)
                   for A, B in self.weights.values())

    def percent_of(self, base) -> float:
        return 100.0 * self.num_parameters / base.num_parameters

    def summary(self, base=None) -> dict:
        out = {**self.spec.to_dict(), "modules": len(self.weights), "parameters": self.num_parameters,
               "bytes": self.num_bytes}
        if base is not None:
            out["percent_of_base"] = round(self.percent_of(base), 4)
        return out

    def check_fits(self, base) -> None:
        """Every tensor maps to a base module of the right shape and its delta is not absurdly large for that
        layer (:meth:`check_delta_norms`); raises :class:`AdapterError` otherwise."""
        linears = base.linear_modules()
        for name, (A, B) in self.weights.items():
            linear = linears.get(name)
            if linear is None:
                raise AdapterError(
                    f"adapter module {name!r} does not exist in base {base.name!r} "
                    "(wrong base, or a module-prefix mismatch)"
                )
            if name.rsplit(".", 1)[-1] not in self.spec.target_modules:
                raise AdapterError(f"adapter module {name!r} is not among its target_modules {list(self.spec.target_modules)}")
            want_a, want_b = (self.spec.rank, linear.in_features), (linear.out_features, self.spec.rank)
            if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
                raise AdapterError(
                    f"tensor shapes for {name!r} do not fit base {base.name!r}: lora_A {tuple(A.shape)} "
                    f"(expected {want_a}), lora_B {tuple(B.shape)} (expected {want_b})"
                )
        self.check_delta_norms(base)

    def delta_norms(self) -> dict[str, float]:
        """``||scaling * B @ A||_F`` per module, in float64 without forming the (out, in) product:
        ``||BA||_F^2 = sum((B^T B) * (A A^T))`` — (r, r) matrices, cheap for any layer size."""
        out = {}
        for name, (A, B) in self.weights.items():
            A64, B64 = A.detach().double(), B.detach().double()
            sq = float(((B64.T @ B64) * (A64 @ A64.T)).sum())  # (r, r) * (r, r)
            out[name] = abs(self.spec.scaling) * math.sqrt(max(sq, 0.0)) if math.isfinite(sq) else math.inf
        return out

    def check_delta_norms(self, base, max_ratio: float | None = None) -> None:
        """Refuse a delta absurdly large for its layer: ``||scaling * B @ A||_F`` above ``max_ratio`` (default
        :data:`MAX_DELTA_RATIO`) times the base weight's ``||W||_F``. Finite but huge weights (every tensor x 1e30)
        pass the finiteness check and then overflow the forward pass to NaN; a real adapter moves a layer by a
        small fraction of its norm. Raises :class:`AdapterError` naming the module and both norms."""
        bound = MAX_DELTA_RATIO if max_ratio is None else max_ratio
        norms = base_weight_norms(base)
        for name, delta in self.delta_norms().items():
            ref = norms.get(name)
            if ref is None:
                continue  # check_fits names unknown modules
            if not delta <= bound * max(ref, 1e-12):
                raise AdapterError(
                    f"adapter module {name!r}: its delta's norm {delta:.3g} is {delta / max(ref, 1e-12):.3g}x the "
                    f"base layer's ({ref:.3g}), over the bound of {bound:g}x: the weights are corrupt or "
                    "mis-scaled (they would overflow the forward pass)"
                )

    def delta_weight(self, name: str) -> Tensor:
        """``scaling * B @ A`` for one module, ``(out, in)`` — for merging and for tests."""
        A, B = self.weights[name]
        return self.spec.scaling * (B.float() @ A.float())
