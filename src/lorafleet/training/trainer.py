"""The multi-tenant trainer: one optimizer step carries rows of several users over one resident base.

Each row goes through its own user's adapter via the shared operator (a step's :class:`StackedWeights`).
The step's loss is the sum over users of each user's mean token loss; a user's parameters only touch that
user's rows, so each adapter receives exactly the gradient of its own loss — the same update as a step
taken alone. Each user has its own optimizer (AdamW or SGD), learning rate and step count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from lorafleet.adapters import LoraAdapter, LoraHost, StackedWeights, as_lora
from lorafleet.training.data import IGNORE, Dataset, TokenizeReport, tokenize_pair, tokenize_sft
from lorafleet.training.losses import dpo_loss, labelled_logprobs


class TrainConfigError(ValueError):
    """A training hyperparameter is out of range; the message names the field."""


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
    step: int = 0
    cursor: int = 0
    order: list[int] = field(default_factory=list)
    epoch: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.step >= self.config.steps

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


def _pad(rows: list[list[int]], labels: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    return ids, lab, mask


class MultiTenantTrainer:
    """Trains many users' adapters together on one resident base (see the module docstring)."""

    def __init__(self, base) -> None:
        self.base = base
        self.host = LoraHost.attach(base.model)
        self.users: dict[str, UserTrack] = {}

    def add(self, key: str, adapter: LoraAdapter, dataset: Dataset, config: TrainConfig) -> UserTrack:
        """Register a user's adapter (its tensors become trainable leaves) and tokenized data."""
        if key in self.users:
            raise ValueError(f"user {key!r} is already in this trainer")
        if dataset.kind != config.method:
            raise ValueError(f"dataset is {dataset.kind!r} but the method is {config.method!r}")
        adapter.check_fits(self.base)
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
                          optimizer=_make_optimizer([t for ab in adapter.weights.values() for t in ab], config))
        self.users[key] = track
        return track

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
        self.base.model.train(False)  # the base stays in eval mode (no base dropout); only adapters learn
        losses: dict[str, Tensor] = {}
        for method in ("sft", "dpo"):
            group = [t for t in tracks if t.config.method == method]
            if group:
                losses.update((self._sft_losses if method == "sft" else self._dpo_losses)(group))
        total = torch.stack(list(losses.values())).sum()
        total.backward()
        out = {}
        for t in tracks:
            if t.config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(t.params(), t.config.grad_clip)
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            t.step += 1
            out[t.key] = float(losses[t.key].detach())
            t.losses.append(out[t.key])
        return out

    def _sft_losses(self, group: list[UserTrack]) -> dict[str, Tensor]:
        rows, labels, slots = [], [], []
        for slot, t in enumerate(group):
            for item in t.next_items():
                rows.append(item.input_ids)
                labels.append(item.labels)
                slots.append(slot)
        ids, lab, mask = _pad(rows, labels, self.base.tokenizer.pad_token_id)
        device = self.base.device
        table = StackedWeights([as_lora(t.adapter) for t in group], train=True)  # tiny formats expand
        with self.host.route(table, slots):
            logp, count = labelled_logprobs(self.base.model, ids.to(device), mask.to(device), lab.to(device))
        nll = -logp
        slot_t = torch.tensor(slots, device=device)
        out = {}
        for slot, t in enumerate(group):
            sel = slot_t == slot
            out[t.key] = nll[sel].sum() / count[sel].sum().clamp(min=1)
        return out

    def _dpo_losses(self, group: list[UserTrack]) -> dict[str, Tensor]:
        rows, labels, slots = [], [], []
        for slot, t in enumerate(group):
            for pair in t.next_items():
                for seq in (pair.chosen, pair.rejected):
                    rows.append(seq)
                    labels.append([IGNORE] * pair.prompt_len + seq[pair.prompt_len:])
                    slots.append(slot)
        ids, lab, mask = _pad(rows, labels, self.base.tokenizer.pad_token_id)
        device = self.base.device
        ids, lab, mask = ids.to(device), lab.to(device), mask.to(device)
        table = StackedWeights([as_lora(t.adapter) for t in group], train=True)  # tiny formats expand
        with self.host.route(table, slots):
            policy, _ = labelled_logprobs(self.base.model, ids, mask, lab)
        with torch.no_grad():  # reference = the base, adapter off: no second copy of the model
            ref, _ = labelled_logprobs(self.base.model, ids, mask, lab)
        slot_t = torch.tensor(slots[::2], device=device)  # one entry per pair
        pc, pr, rc, rr = policy[0::2], policy[1::2], ref[0::2], ref[1::2]
        out = {}
        for slot, t in enumerate(group):
            sel = slot_t == slot
            out[t.key] = dpo_loss(pc[sel], pr[sel], rc[sel], rr[sel], beta=t.config.beta).mean()
        return out

    @torch.no_grad()
    def eval_loss(self, key: str, dataset: Dataset, max_len: int | None = None) -> float:
        """Mean token loss of ``dataset`` (SFT) under user ``key``'s adapter; ``math.nan`` if nothing to score."""
        t = self.users[key]
        return sft_eval_loss(self.base, t.adapter, dataset, max_len or t.config.max_len)

    def state_dict(self, key: str) -> dict:
        """Everything needed to resume user ``key`` exactly: weights, optimizer, step, sampler position."""
        t = self.users[key]
        return {
            "weights": {n: (A.detach().clone(), B.detach().clone()) for n, (A, B) in t.adapter.weights.items()},
            "optimizer": t.optimizer.state_dict(),
            "step": t.step, "cursor": t.cursor, "order": list(t.order), "epoch": t.epoch, "losses": list(t.losses),
        }

    def load_state_dict(self, key: str, state: dict) -> None:
        t = self.users[key]
        with torch.no_grad():
            for n, (A, B) in state["weights"].items():
                t.adapter.weights[n][0].copy_(A)
                t.adapter.weights[n][1].copy_(B)
        t.optimizer.load_state_dict(state["optimizer"])
        t.step, t.cursor, t.order, t.epoch = state["step"], state["cursor"], list(state["order"]), state["epoch"]
        t.losses = list(state["losses"])


@torch.no_grad()
def sft_eval_loss(base, adapter: LoraAdapter | None, dataset: Dataset, max_len: int = 256, batch: int = 8) -> float:
    """Mean token NLL of an SFT dataset under ``adapter`` (None = the base alone)."""
    host = LoraHost.attach(base.model)
    items = [tokenize_sft(base.tokenizer, r, max_len) for r in dataset.records]
    total, count = 0.0, 0
    table = StackedWeights([as_lora(adapter)]) if adapter is not None else None
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        ids, lab, mask = _pad([c.input_ids for c in chunk], [c.labels for c in chunk], base.tokenizer.pad_token_id)
        with host.route(table, [0] * len(chunk) if table is not None else None):
            logp, n = labelled_logprobs(base.model, ids.to(base.device), mask.to(base.device), lab.to(base.device))
        total -= float(logp.sum())
        count += int(n.sum())
    return total / count if count else math.nan
