"""What a LoRA adapter is: its configuration, validated at construction."""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field

from lorafleet.adapters.errors import AdapterError

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
# Shorthands a user may give instead of projection names.
TARGET_GROUPS = {
    "attention": ATTENTION_TARGETS,
    "attn": ATTENTION_TARGETS,
    "mlp": MLP_TARGETS,
    "all": ATTENTION_TARGETS + MLP_TARGETS,
    "all-linear": ATTENTION_TARGETS + MLP_TARGETS,
}
MAX_RANK = 64


def expand_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"attention"`` / ``"mlp"`` / ``"all"`` / a comma list / a sequence -> sorted unique projection names."""
    if not isinstance(targets, str | tuple | list):
        raise AdapterError(f"target_modules must be a list of module names, got a {type(targets).__name__}")
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    out: set[str] = set()
    for raw in items:
        if not isinstance(raw, str):
            raise AdapterError(f"target_modules must be a list of module names (strings), got an item of type "
                               f"{type(raw).__name__}: {reprlib.repr(raw)}")
        name = raw.strip()
        if not name:
            continue
        out.update(TARGET_GROUPS.get(name, (name,)))
    if not out:
        raise AdapterError("target_modules: no target module given; use e.g. 'attention', 'mlp', 'all' or 'q_proj,v_proj'")
    return tuple(sorted(out))


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA configuration (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

    ``delta W = (alpha / rank) * B @ A`` with ``A: (rank, in)``, ``B: (out, rank)``.
    """

    rank: int = field(default=8, metadata={"help": "LoRA rank r, 1..64"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: scaling = alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input during training, 0 <= p < 1"})
    target_modules: tuple[str, ...] = field(
        default=ATTENTION_TARGETS, metadata={"help": "projection names (q_proj, ..., down_proj) or attention/mlp/all"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
            raise AdapterError(f"rank must be an integer in 1..{MAX_RANK}, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise AdapterError(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", expand_targets(self.target_modules))
        known = set(ATTENTION_TARGETS + MLP_TARGETS)
        unknown = sorted(set(self.target_modules) - known)
        if unknown:
            raise AdapterError(
                f"unknown target module(s) {unknown}; known: {sorted(known)} or the groups attention, mlp, all"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "target_modules": list(self.target_modules)}
