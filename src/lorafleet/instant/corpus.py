"""The generator's corpus: (profile, trained adapter) pairs that lorafleet makes itself, cached on disk.

Each corpus persona of the family (:mod:`lorafleet.instant.family`) gets a rank-1 LoRA trained by the packed
multi-user trainer (``pack`` users per optimizer step, all from the same init), and two feature rows: its
description alone, and its description with its first ``k`` training examples (so the generator serves both
kinds of profile). Every persona's result is written to ``<cache>/<corpus digest>/<persona>.safetensors`` as
soon as its pack finishes (``<cache>`` keyed by the settings: the family, the adapter spec, the training
config, the base fingerprint, the embedding version): a rerun reads them back, a stopped build resumes, and a
larger corpus reuses a smaller one's personas. The corpus digest covers the settings and the persona list.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorafleet.adapters import LoraAdapter, LoraSpec
from lorafleet.instant.embed import profile_features_many
from lorafleet.instant.family import FAMILY, ComboPersona
from lorafleet.instant.generator import INIT_SEED, flatten, layout_of
from lorafleet.training.trainer import MultiTenantTrainer, TrainConfig

EMBED_VERSION = "mid+last-mean-v1"


@dataclass(frozen=True)
class CorpusConfig:
    spec: LoraSpec
    # Measured on SmolLM2 (8 held-out family personas, 6 prompts each): 24 steps x 1 row at lr 2e-3 -> 77% strict
    # adherence (93% of habits); lr 4e-3 -> 62%; lr 8e-3 collapsed by step 24 (alpha 16 on rank 1 scales the
    # update 16x). max_len 96 holds every family record (~65 tokens, at most ~80 with the chat template): a shorter
    # cut drops the sign-off at the end of the answer from training.
    steps: int = 24
    lr: float = 2e-3
    batch_size: int = 1
    max_len: int = 96
    pack: int = 16  # users per packed optimizer step
    n_train: int = 16  # training examples per persona
    k: int = 4  # examples in the with-examples feature row
    # Activation checkpointing of the packed passes ("auto"/"on"/"off"): the same values and gradients either way,
    # so it is not part of the corpus' identity (not in to_dict). A pack of 16 short rows fits in ~2.5 GB without it.
    checkpoint: str = "off"

    @classmethod
    def with_options(cls, spec: LoraSpec, **options) -> CorpusConfig:
        """The config with the options a user gave; an option left None keeps its measured default above."""
        return cls(spec=spec, **{k: v for k, v in options.items() if v is not None})

    def train_config(self, seed: int = 0, steps: int | None = None) -> TrainConfig:
        return TrainConfig(steps=steps or self.steps, lr=self.lr, batch_size=self.batch_size, max_len=self.max_len,
                           seed=seed)

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "steps": self.steps, "lr": self.lr, "batch_size": self.batch_size,
                "max_len": self.max_len, "pack": self.pack, "n_train": self.n_train, "k": self.k}


@dataclass
class Corpus:
    personas: list[ComboPersona]
    features: torch.Tensor  # (2N, D): rows 2i (description) and 2i+1 (description + k examples) of persona i
    thetas: torch.Tensor  # (N, P)
    layout: list[list]
    digest: str
    seconds: float  # building time of what was not cached
    cached: int  # personas read back from the cache

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(features, targets, groups)``: each persona's adapter is the target of both its rows, and ``groups``
        gives each row its persona's index (what :func:`~lorafleet.instant.generator.fit_generator` splits by)."""
        groups = torch.arange(len(self.personas)).repeat_interleave(2)
        return self.features, self.thetas.repeat_interleave(2, dim=0), groups


def _settings(base, cfg: CorpusConfig) -> dict:
    return {"family": FAMILY, "config": cfg.to_dict(), "base": base.fingerprint, "embed": EMBED_VERSION,
            "init_seed": INIT_SEED}


def cache_key(base, cfg: CorpusConfig) -> str:
    """The cache folder: everything but the persona list (a persona's file does not depend on the others, so
    corpora of different sizes share their common personas)."""
    return hashlib.sha256(json.dumps(_settings(base, cfg), sort_keys=True).encode()).hexdigest()


def corpus_digest(base, personas: Sequence[ComboPersona], cfg: CorpusConfig) -> str:
    """The corpus' identity (recorded as the generator's ``dataset_digest``): the settings and the personas."""
    key = {**_settings(base, cfg), "personas": [p.to_dict() for p in personas]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def train_many(base, starts: Sequence[LoraAdapter], datasets: Sequence, cfg: CorpusConfig, *, steps: int,
               snapshots: Sequence[int] = (), seed: int = 0,
               on_step: Callable[[int, int], None] | None = None) -> dict[int, list[LoraAdapter]]:
    """Train each start adapter on its dataset for ``steps`` steps, ``cfg.pack`` users per packed step;
    returns ``{n: adapters after n steps}`` for every ``n`` in ``snapshots`` and ``steps``."""
    marks = sorted({*snapshots, steps})
    out: dict[int, list[LoraAdapter]] = {n: [None] * len(starts) for n in marks}
    done = 0
    for g0 in range(0, len(starts), cfg.pack):
        trainer = MultiTenantTrainer(base, checkpoint=cfg.checkpoint)
        keys = []
        for i in range(g0, min(g0 + cfg.pack, len(starts))):
            a = starts[i]
            copy = LoraAdapter(spec=a.spec, weights={n: (A.detach().clone(), B.detach().clone())
                                                     for n, (A, B) in a.weights.items()}, base_name=a.base_name)
            trainer.add(str(i), copy, datasets[i], cfg.train_config(seed=seed + i, steps=steps))
            keys.append(str(i))
        for n in range(1, steps + 1):
            trainer.step(keys)
            if n in out:
                for k in keys:
                    w = trainer.users[k].adapter
                    out[n][int(k)] = LoraAdapter(spec=w.spec, base_name=w.base_name,
                                                 weights={m: (A.detach().clone(), B.detach().clone())
                                                          for m, (A, B) in w.weights.items()})
            if on_step is not None:
                on_step(done + n, -1)
        done += steps
    return out


def build_corpus(base, personas: Sequence[ComboPersona], cfg: CorpusConfig, cache_dir: str | Path, *,
                 say: Callable[[str], None] = lambda s: None) -> Corpus:
    """Train (or read back) every persona's adapter and embed its profiles; see the module docstring."""
    digest = corpus_digest(base, personas, cfg)
    where = Path(cache_dir) / cache_key(base, cfg)
    where.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    todo = [i for i, p in enumerate(personas) if not (where / f"{p.name}.safetensors").exists()]
    cached = len(personas) - len(todo)
    init = LoraAdapter.create(base, cfg.spec, seed=INIT_SEED)
    for g0 in range(0, len(todo), cfg.pack):
        group = todo[g0: g0 + cfg.pack]
        data = [personas[i].data(cfg.n_train) for i in group]
        datasets = [personas[i].train_dataset(cfg.n_train) for i in group]
        trained = train_many(base, [init] * len(group), datasets, cfg, steps=cfg.steps)[cfg.steps]
        feats = profile_features_many(base, [(personas[i].describe(), None) for i in group]
                                      + [(personas[i].describe(), d[0][: cfg.k]) for i, d in zip(group, data, strict=True)])
        n = len(group)
        for j, i in enumerate(group):
            save_file({"theta": flatten(trained[j]).contiguous(), "features": torch.stack([feats[j], feats[n + j]])},
                      str(where / f"{personas[i].name}.safetensors"))
        say(f"corpus: {cached + g0 + n}/{len(personas)} personas ({time.perf_counter() - t0:.0f}s)")
    thetas, features = [], []
    for p in personas:
        t = load_file(str(where / f"{p.name}.safetensors"))
        thetas.append(t["theta"])
        features.append(t["features"])
    (where / f"corpus-{digest[:16]}.json").write_text(json.dumps(
        {"digest": digest, "config": cfg.to_dict(), "base": base.fingerprint,
         "personas": [p.to_dict() for p in personas]}, indent=1))
    return Corpus(personas=list(personas), features=torch.cat(features), thetas=torch.stack(thetas),
                  layout=layout_of(init), digest=digest, seconds=time.perf_counter() - t0, cached=cached)
