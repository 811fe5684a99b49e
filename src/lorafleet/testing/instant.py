"""A generator for instant adapters without a training corpus: for tests of the product path (CLI, API)."""

from __future__ import annotations

import torch

from lorafleet.adapters import LoraAdapter
from lorafleet.instant import DEFAULT_SPEC, fit_generator, split_family
from lorafleet.instant.embed import profile_features_many
from lorafleet.instant.generator import INIT_SEED, flatten, layout_of


def synthetic_generator(base, corpus_digest: str = "1" * 64):
    """Fitted on real profile features of 8 generated personas (description alone and with one example) and
    synthetic adapters around the shared init: small random offsets, no training."""
    personas, _ = split_family(8, 0, seed=2)
    feats = profile_features_many(base, [(p.describe(), None) for p in personas]
                                  + [(p.describe(), p.data(2, 1)[0]) for p in personas])
    init_adapter = LoraAdapter.create(base, DEFAULT_SPEC, seed=INIT_SEED)
    init = flatten(init_adapter)
    mix = torch.randn(feats.shape[1], init.numel(), generator=torch.Generator().manual_seed(0)) * 1e-4
    return fit_generator(feats, init + (feats - feats.mean(0)) @ mix, spec=DEFAULT_SPEC, layout=layout_of(init_adapter),
                         base_fingerprint=base.fingerprint, corpus_digest=corpus_digest, components=4)
