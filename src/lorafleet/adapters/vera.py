r"""VeRA: a personal model far smaller than rank-1 LoRA, served by the same LoRA operator.

VeRA (Kopiczko et al., 2024, https://arxiv.org/abs/2310.11454) shares one pair of *frozen random* matrices
across every user and layer, and gives each user only two scaling vectors per module::

    delta W x = diag(b) B0 diag(d) A0 x        A0: (r, in_max)[:, :in]   B0: (out_max, r)[:out, :]
                                                d: (r,)   b: (out,)      <- the only per-user numbers

``A0`` / ``B0`` are regenerated from ``projection_seed`` exactly like ``peft``'s VeRA (Kaiming-uniform from a
CPU ``torch.Generator`` seeded with ``projection_prng_key``, A first, then B, sized by the largest targeted
in/out features, sliced per module), so a stored adapter is the vectors alone: with attention targets on
SmolLM2-135M about 48 k numbers (~96 KB in fp16) against ~115 k for rank-1 LoRA on the same targets.

Serving and training expand it to a plain LoRA adapter, ``A' = diag(d) A0``, ``B' = diag(b) B0``, scaling 1
(:meth:`VeraAdapter.to_lora`). The expansion is differentiable, so the multi-tenant trainer trains ``d`` and
``b`` through it, and a VeRA user sits in the same batch as LoRA users through the same operator.
Trade-off: *storage* is tiny, but a compute slot holds the expanded rank-``r`` LoRA (slot memory = rank-r LoRA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

from lorafleet.adapters.errors import AdapterError
from lorafleet.adapters.spec import ATTENTION_TARGETS, MAX_RANK, MLP_TARGETS, LoraSpec, expand_targets
from lorafleet.adapters.weights import LoraAdapter

FORMAT = "vera"


@dataclass(frozen=True)
class VeraSpec:
    """A VeRA configuration; the field names follow ``peft.VeraConfig`` where it has them."""

    rank: int = field(default=16, metadata={"help": "rank of the shared random projections, 1..64 (a slot's rank)"})
    target_modules: tuple[str, ...] = field(default=ATTENTION_TARGETS, metadata={"help": "projections or groups"})
    projection_seed: int = field(default=0, metadata={"help": "peft's projection_prng_key: seeds A0 and B0"})
    d_initial: float = field(default=0.1, metadata={"help": "initial value of every d entry (b starts at 0)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the input during training, 0 <= p < 1"})

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
            raise AdapterError(f"VeRA rank must be an integer in 1..{MAX_RANK}, got {self.rank!r}")
        seed = self.projection_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise AdapterError(f"projection_seed must be a non-negative integer, got {seed!r}")
        if not isinstance(self.d_initial, (int, float)) or not math.isfinite(self.d_initial):
            raise AdapterError(f"d_initial must be a finite number, got {self.d_initial!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "d_initial", float(self.d_initial))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", expand_targets(self.target_modules))
        unknown = sorted(set(self.target_modules) - set(ATTENTION_TARGETS + MLP_TARGETS))
        if unknown:
            raise AdapterError(f"unknown target module(s) {unknown}; use projection names or attention/mlp/all")

    def to_dict(self) -> dict:
        return {"format": FORMAT, "rank": self.rank, "target_modules": list(self.target_modules),
                "projection_seed": self.projection_seed, "d_initial": self.d_initial, "dropout": self.dropout}


def _kaiming(shape: tuple[int, int], gen: torch.Generator) -> Tensor:
    """``peft.tuners.vera.model._kaiming_init``: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in = shape[1])."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


@lru_cache(maxsize=16)
def projections(seed: int, rank: int, in_max: int, out_max: int) -> tuple[Tensor, Tensor]:
    """The shared frozen ``(A0: (r, in_max), B0: (out_max, r))`` — identical to peft's for the same key."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    A0 = _kaiming((rank, in_max), gen)
    B0 = _kaiming((out_max, rank), gen)
    return A0, B0


@dataclass
class VeraAdapter:
    """``weights[module] = (d: (r,), b: (out,))``; ``dims[projection] = (in, out)`` of the base it was made for."""

    spec: VeraSpec
    weights: dict[str, tuple[Tensor, Tensor]]
    dims: dict[str, tuple[int, int]]
    base_name: str | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def create(cls, base, spec: VeraSpec) -> VeraAdapter:
        """A new adapter for ``base``: ``d = d_initial``, ``b = 0`` (so it starts as the base, like peft)."""
        weights, dims = {}, {}
        for name, linear in sorted(base.linear_modules().items()):
            proj = name.rsplit(".", 1)[-1]
            if proj not in spec.target_modules:
                continue
            dims[proj] = (linear.in_features, linear.out_features)
            weights[name] = (torch.full((spec.rank,), spec.d_initial), torch.zeros(linear.out_features))
        if not weights:
            raise AdapterError(f"base {base.name!r} has none of the target modules {list(spec.target_modules)}")
        return cls(spec=spec, weights=weights, dims=dims, base_name=base.name)

    @property
    def in_out_max(self) -> tuple[int, int]:
        return max(i for i, _ in self.dims.values()), max(o for _, o in self.dims.values())

    @property
    def num_parameters(self) -> int:
        return sum(d.numel() + b.numel() for d, b in self.weights.values())

    def to_lora(self) -> LoraAdapter:
        """The equivalent rank-``r`` LoRA adapter (scaling 1); differentiable w.r.t. ``d`` and ``b``."""
        in_max, out_max = self.in_out_max
        A0, B0 = projections(self.spec.projection_seed, self.spec.rank, in_max, out_max)
        weights = {}
        for name, (d, b) in self.weights.items():
            n_in, n_out = self.dims[name.rsplit(".", 1)[-1]]
            A = d[:, None] * A0[:, :n_in].to(d.dtype)  # (r, in)
            B = b[:, None] * B0[:n_out, :].to(b.dtype)  # (out, r)
            weights[name] = (A, B)
        spec = LoraSpec(rank=self.spec.rank, alpha=float(self.spec.rank), dropout=self.spec.dropout,
                        target_modules=self.spec.target_modules)
        return LoraAdapter(spec=spec, weights=weights, base_name=self.base_name,
                           meta={**self.meta, "format": FORMAT, "vera_parameters": self.num_parameters})

    def check_fits(self, base) -> None:
        """Every module exists in ``base`` with the recorded in/out features and vectors of the right length."""
        self.check_shapes()
        linears = base.linear_modules()
        for name in self.weights:
            linear = linears.get(name)
            if linear is None:
                raise AdapterError(f"VeRA module {name!r} does not exist in base {base.name!r} (wrong base?)")
            n_in, n_out = self.dims[name.rsplit(".", 1)[-1]]
            if (linear.in_features, linear.out_features) != (n_in, n_out):
                raise AdapterError(f"VeRA module {name!r} was made for in/out {(n_in, n_out)}; base {base.name!r} has "
                                   f"{(linear.in_features, linear.out_features)}")

    def check_shapes(self) -> None:
        """Self-consistency without a base: targets, dims and vector lengths agree."""
        for name, (d, b) in self.weights.items():
            proj = name.rsplit(".", 1)[-1]
            if proj not in self.spec.target_modules:
                raise AdapterError(f"VeRA module {name!r} is not among its target_modules {list(self.spec.target_modules)}")
            if proj not in self.dims:
                raise AdapterError(f"VeRA module {name!r}: no recorded in/out features for {proj!r}")
            if tuple(d.shape) != (self.spec.rank,) or tuple(b.shape) != (self.dims[proj][1],):
                raise AdapterError(f"VeRA module {name!r}: d {tuple(d.shape)} / b {tuple(b.shape)} do not fit rank "
                                   f"{self.spec.rank} and out_features {self.dims[proj][1]}")


def as_lora(adapter):
    """A tiny format (VeRA) as the LoRA adapter the operator runs; anything else (LoRA, a stack, None) as is."""
    return adapter.to_lora() if isinstance(adapter, VeraAdapter) else adapter
