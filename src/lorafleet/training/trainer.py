"""The multi-tenant trainer: one optimizer step carries rows of several users over one resident base.

Each row goes through its own user's adapter via the shared operator (a step's :class:`StackedWeights`).
The step's loss is the sum over users of each user's mean token loss; a user's parameters only touch that
user's rows, so each adapter receives exactly the gradient of its own loss — the same update as a step
taken alone. Each user has its own optimizer (AdamW or SGD), learning rate and step count. The packed pass is
:func:`lorafleet.training.step.packed_forward` (shared with the Tinker service).

Training on top of a stack: a user added with frozen ``parents`` (e.g. the organisation's and the team's
adapters, root first) has every row routed through the parents' levels as well (the operator sums the levels'
deltas, as in serving), but only the user's own adapter is a leaf of the optimizer: it learns what the person
adds on top of the stack. Parents shared by several users in a step are one slot of the step's table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor

from lorafleet.adapters import LoraAdapter, LoraHost, as_lora
from lorafleet.adapters.stack import MAX_LEVELS, AdapterStack
from lorafleet.base.loader import bound_heap_retention
from lorafleet.errors import LorafleetError
from lorafleet.registry import faults
from lorafleet.training.checkpoint import load_weights, weights_of
from lorafleet.training.data import IGNORE, Dataset, TokenizeReport, tokenize_pair, tokenize_sft
from lorafleet.training.losses import dpo_loss
from lorafleet.training.step import backward_sum, packed_forward, resolve_checkpoint


class TrainConfigError(LorafleetError, ValueError):
    """A training hyperparameter is out of range; the message names the field."""

    http_status, code = 422, "invalid_config"


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one user's training; recorded in the revision's provenance."""

    method: str = "sft"  # "sft" | "dpo"
    steps: int = 30
    lr: float = 1e-3
    batch_size: int = 4  # this user's rows per step
    max_len: int = 256  # tokens; longer examples are truncated and counted
    optimizer: str = "adamw"  # "adamw" | "sgd"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # 0 = off
    beta: float = 0.1  # DPO temperature
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "method": self.method in ("sft", "dpo"),
            "steps": isinstance(self.steps, int) and self.steps >= 1,
            "lr": self.lr > 0,
            "batch_size": isinstance(self.batch_size, int) and self.batch_size >= 1,
            "max_len": isinstance(self.max_len, int) and self.max_len >= 8,
            "optimizer": self.optimizer in ("adamw", "sgd"),
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip >= 0,
            "beta": self.beta > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise TrainConfigError(f"invalid training config field(s) {bad}: got {[getattr(self, k) for k in bad]}")

    def to_dict(self) -> dict:
        return {**asdict(self), "betas": list(self.betas)}


@dataclass
class UserTrack:
    """One user's state inside the trainer."""

    key: str
    adapter: LoraAdapter  # or a VeraAdapter: ``weights`` holds its trainable (d, b) vectors instead of (A, B)
    config: TrainConfig
    items: list  # tokenized examples or pairs
    optimizer: torch.optim.Optimizer
    report: TokenizeReport
    parents: tuple[LoraAdapter, ...] = ()  # frozen levels under this user's adapter, root first
    step: int = 0
    cursor: int = 0
    order: list[int] = field(default_factory=list)
    epoch: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.step >= self.config.steps

    @property
    def stack(self) -> LoraAdapter | AdapterStack:
        """What this user's rows are routed through: the frozen parents, then the trained adapter (a tiny format
        such as VeRA expanded to its LoRA, differentiably: call once per step, each call is a new expansion)."""
        top = as_lora(self.adapter)
        return AdapterStack((*self.parents, top)) if self.parents else top

    def params(self) -> list[Tensor]:
        return [t for ab in self.adapter.weights.values() for t in ab]

    def next_items(self) -> list:
        """The next ``batch_size`` items of a seeded per-epoch shuffle (deterministic, resumable)."""
        out = []
        while len(out) < self.config.batch_size:
            if self.cursor >= len(self.order):
                g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.epoch)
                self.order = torch.randperm(len(self.items), generator=g).tolist()
                self.cursor, self.epoch = 0, self.epoch + 1
            out.append(self.items[self.order[self.cursor]])
            self.cursor += 1
        return out


def _make_optimizer(params: list[Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


class MultiTenantTrainer:
    """Trains many users' adapters together on one resident base (see the module docstring).

    ``checkpoint``: activation checkpointing of the base's decoder layers in each step's pass — ``"auto"`` (on from
    :data:`~lorafleet.training.step.CHECKPOINT_MIN_TOKENS` padded tokens per pass), ``"on"``/True or
    ``"off"``/False (see :mod:`lorafleet.training.step`); the updates are the same either way. A trainer also
    bounds the C heap's retention of freed step tensors for the process (:func:`~lorafleet.base.loader.bound_heap_retention`).
    """

    def __init__(self, base, *, checkpoint: bool | str = "auto") -> None:
        self.checkpoint = resolve_checkpoint(checkpoint)  # a bad value: StepOptionError, before anything changes
        bound_heap_retention()
        self.base = base
        self.host = LoraHost.attach(base.model)
        self.users: dict[str, UserTrack] = {}
        self._frozen_of: dict[int, tuple[LoraAdapter, LoraAdapter]] = {}  # id(parent) -> (parent, frozen copy)

    def add(self, key: str, adapter: LoraAdapter, dataset: Dataset, config: TrainConfig,
            parents: Sequence[LoraAdapter] = ()) -> UserTrack:
        """Register a user's adapter (its tensors become trainable leaves) and tokenized data.

        ``parents``: frozen adapters applied under it (root first; a stack of at most ``MAX_LEVELS`` levels with
        the adapter). Pass the same objects for users sharing a parent: they then share one slot per step.
        """
        if key in self.users:
            raise ValueError(f"user {key!r} is already in this trainer")
        if dataset.kind != config.method:
            raise ValueError(f"dataset is {dataset.kind!r} but the method is {config.method!r}")
        if len(parents) + 1 > MAX_LEVELS:
            raise ValueError(f"user {key!r}: {len(parents)} frozen parents + its adapter exceed {MAX_LEVELS} levels")
        adapter.check_fits(self.base)
        for parent in parents:
            parent.check_fits(self.base)
        for name, (A, B) in list(adapter.weights.items()):
            adapter.weights[name] = (A.detach().float().clone().requires_grad_(True),
                                     B.detach().float().clone().requires_grad_(True))
        tok, report, items = self.base.tokenizer, TokenizeReport(), []
        for i, record in enumerate(dataset.records):
            item = (tokenize_sft if config.method == "sft" else tokenize_pair)(tok, record, config.max_len)
            if config.method == "sft" and all(t == IGNORE for t in item.labels[1:]):
                report.dropped.append(i)  # truncation left no answer token to learn from
                continue
            report.truncated += item.truncated
            items.append(item)
        report.examples = len(items)
        if not items:
            raise ValueError(f"user {key!r}: no usable example after tokenization (all too long for max_len={config.max_len})")
        track = UserTrack(key=key, adapter=adapter, config=config, items=items, report=report,
                          optimizer=_make_optimizer([t for ab in adapter.weights.values() for t in ab], config),
                          parents=tuple(self._frozen(p) for p in parents))
        self.users[key] = track
        return track

    def _frozen(self, parent: LoraAdapter) -> LoraAdapter:
        """A parent as a frozen level: no gradient, no dropout (it is applied as it is served). One frozen copy per
        parent object, so users sharing a parent share its slot."""
        hit = self._frozen_of.get(id(parent))
        if hit is not None and hit[0] is parent:
            return hit[1]
        frozen = LoraAdapter(spec=replace(parent.spec, dropout=0.0), base_name=parent.base_name,
                             weights={n: (A.detach().float(), B.detach().float()) for n, (A, B) in parent.weights.items()})
        in_use = {id(p) for t in self.users.values() for p in t.parents}  # forget parents of departed users
        self._frozen_of = {k: v for k, v in self._frozen_of.items() if id(v[1]) in in_use}
        self._frozen_of[id(parent)] = (parent, frozen)
        return frozen

    def remove(self, key: str) -> UserTrack:
        return self.users.pop(key)

    def active(self) -> list[UserTrack]:
        return [u for u in self.users.values() if not u.done]

    def step(self, keys: list[str] | None = None) -> dict[str, float]:
        """One optimizer step for each listed (default: every unfinished) user, packed in one forward/backward
        per method. Returns each user's loss for this step."""
        tracks = [self.users[k] for k in keys] if keys is not None else self.active()
        tracks = [t for t in tracks if not t.done]
        if not tracks:
            return {}
        losses: dict[str, Tensor] = {}
        for method in ("sft", "dpo"):
            group = [t for t in tracks if t.config.method == method]
            if group:
                losses.update((self._sft_losses if method == "sft" else self._dpo_losses)(group))
        backward_sum(losses.values())  # one backward: each adapter gets its own loss's gradient
        out = {}
        for t in tracks:
            if t.config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(t.params(), t.config.grad_clip)
            t.optimizer.step()
            faults.checkpoint("mid_step")  # tests: a crash with this user's weights updated, later users' not
            t.optimizer.zero_grad(set_to_none=True)
            t.step += 1
            out[t.key] = float(losses[t.key].detach())
            t.losses.append(out[t.key])
        return out

    def _sft_losses(self, group: list[UserTrack]) -> dict[str, Tensor]:
        rows, labels, owners = [], [], []
        for k, t in enumerate(group):
            for item in t.next_items():
                rows.append(item.input_ids)
                labels.append(item.labels)
                owners.append(k)
        stacks = [t.stack for t in group]  # one expansion per user per step (tiny formats)
        logp, count = packed_forward(self.base, stacks, owners, rows, labels, checkpoint=self.checkpoint)
        nll = -logp
        owner_t = torch.tensor(owners, device=self.base.device)
        out = {}
        for k, t in enumerate(group):
            sel = owner_t == k
            out[t.key] = nll[sel].sum() / count[sel].sum().clamp(min=1)
        return out

    def _dpo_losses(self, group: list[UserTrack]) -> dict[str, Tensor]:
        rows, labels, owners = [], [], []
        for k, t in enumerate(group):
            for pair in t.next_items():
                for seq in (pair.chosen, pair.rejected):
                    rows.append(seq)
                    labels.append([IGNORE] * pair.prompt_len + seq[pair.prompt_len:])
                    owners.append(k)
        stacks = [t.stack for t in group]  # one expansion per user per step (tiny formats)
        policy, _ = packed_forward(self.base, stacks, owners, rows, labels, checkpoint=self.checkpoint)
        # reference = what the adapter sits on: the base, plus the frozen parents of a stack (no model copy)
        refs = [AdapterStack(t.parents) if t.parents else None for t in group]
        ref, _ = packed_forward(self.base, refs, owners, rows, labels, grad=False, train=False)
        owner_t = torch.tensor(owners[::2], device=self.base.device)  # one entry per pair
        pc, pr, rc, rr = policy[0::2], policy[1::2], ref[0::2], ref[1::2]
        out = {}
        for k, t in enumerate(group):
            sel = owner_t == k
            out[t.key] = dpo_loss(pc[sel], pr[sel], rc[sel], rr[sel], beta=t.config.beta).mean()
        return out

    @torch.no_grad()
    def eval_loss(self, key: str, dataset: Dataset, max_len: int | None = None) -> float:
        """Mean token loss of ``dataset`` (SFT) under user ``key``'s adapter; ``math.nan`` if nothing to score."""
        t = self.users[key]
        return sft_eval_loss(self.base, t.stack, dataset, max_len or t.config.max_len)

    def state_dict(self, key: str) -> dict:
        """Everything needed to resume user ``key`` exactly: weights, optimizer, step, sampler position."""
        t = self.users[key]
        return {
            "weights": weights_of(t.adapter),
            "optimizer": t.optimizer.state_dict(),
            "step": t.step, "cursor": t.cursor, "order": list(t.order), "epoch": t.epoch, "losses": list(t.losses),
        }

    def load_state_dict(self, key: str, state: dict) -> None:
        t = self.users[key]
        load_weights(t.adapter, state["weights"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.step, t.cursor, t.order, t.epoch = state["step"], state["cursor"], list(state["order"]), state["epoch"]
        t.losses = list(state["losses"])


@torch.no_grad()
def sft_eval_loss(base, adapter: LoraAdapter | AdapterStack | None, dataset: Dataset, max_len: int = 256,
                  batch: int = 8) -> float:
    """Mean token NLL of an SFT dataset under ``adapter`` (a stack applies every level; None = the base alone)."""
    items = [tokenize_sft(base.tokenizer, r, max_len) for r in dataset.records]
    total, count = 0.0, 0
    adapter = as_lora(adapter)  # a tiny format (VeRA) is evaluated as its expanded LoRA
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        logp, n = packed_forward(base, [adapter], [0] * len(chunk), [c.input_ids for c in chunk],
                                 [c.labels for c in chunk], train=False)
        total -= float(logp.sum())
        count += int(n.sum())
    return total / count if count else math.nan
