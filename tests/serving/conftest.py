"""Fixtures for the engine tests: a tiny base with sharp (non-degenerate) logits, adapters of several ranks
that visibly change the output, and a reference generator (transformers ``generate`` + peft, one request alone).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from lorafleet.adapters import LoraAdapter, LoraSpec, save_peft, to_bytes
from lorafleet.base import load_base
from lorafleet.digest import digest_of
from lorafleet.serving.engine import Engine, EngineConfig
from lorafleet.serving.sources import DictBlobs


def sharpen(model, seed: int = 0, std: float = 0.15) -> None:
    """Re-draw the tiny model's matrices with a larger std: the default init gives near-uniform logits, whose
    greedy output is one token repeated; this one generates varied tokens (so equality tests can fail)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std, generator=g)


def strong_adapter(base, rank: int, targets: str, seed: int, scale: float = 10.0) -> LoraAdapter:
    """A random adapter whose B is large enough to change greedy tokens."""
    adapter = LoraAdapter.create(base, LoraSpec(rank=rank, alpha=2 * rank, target_modules=targets), seed=seed,
                                 init="random")
    adapter.weights = {k: (A, B * scale) for k, (A, B) in adapter.weights.items()}
    return adapter


@pytest.fixture(scope="module")
def sharp():
    """``(base, plain_model)``: the sharpened tiny base, and an unwrapped copy of it for peft."""
    base = load_base("tiny")
    sharpen(base.model)
    return base, copy.deepcopy(base.model)


@pytest.fixture(scope="module")
def base(sharp):
    return sharp[0]


@pytest.fixture(scope="module")
def adapters(base):
    """Three adapters of different ranks and targets (rank 2 attention, 4 mlp, 8 all)."""
    return [strong_adapter(base, 2, "attention", 1), strong_adapter(base, 4, "mlp", 2),
            strong_adapter(base, 8, "all", 3)]


@pytest.fixture(scope="module")
def make_adapter(base):
    """``make_adapter(rank, targets, seed)``: a strong random adapter for the test base."""
    return lambda rank, targets, seed: strong_adapter(base, rank, targets, seed)


@pytest.fixture
def blobs(adapters):
    source = DictBlobs()
    for a in adapters:
        source.put(a)
    return source


@pytest.fixture
def make_engine(base):
    engines = []

    def make(fetch, **config):
        engine = Engine(base, fetch, EngineConfig(**{"max_rank": 8, **config}))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture(scope="module")
def reference(sharp, tmp_path_factory):
    """``reference(prompt_ids, adapter, max_new_tokens) -> token ids``: transformers generate, peft, alone."""
    base, plain = sharp
    cache: dict = {}

    def run(prompt_ids: list[int], adapter: LoraAdapter | None, max_new_tokens: int,
            ignore_eos: bool = False) -> list[int]:
        # Keyed by content, not id(): a freed temporary adapter's id can be reused by a different one.
        key = None if adapter is None else digest_of(to_bytes(adapter))
        if key not in cache:
            model = copy.deepcopy(plain)
            if adapter is not None:
                path = tmp_path_factory.mktemp("peft")
                save_peft(adapter, path)
                model = PeftModel.from_pretrained(model, path)
            cache[key] = model.eval()
        model = cache[key]
        ids = torch.tensor([prompt_ids])
        config = copy.deepcopy(plain.generation_config)
        # An id outside the vocabulary never comes: the way to make generate ignore the end of sequence.
        config.eos_token_id = [10**6] if ignore_eos else base.tokenizer.eos_token_id
        config.pad_token_id = base.tokenizer.pad_token_id
        config.max_new_tokens, config.do_sample = max_new_tokens, False
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return out[0, ids.shape[1]:].tolist()

    return run


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The tiny model's ops are microseconds long; on a shared 2-core machine, waking a second OpenMP thread
    for each costs far more than it saves (10-20x slower runs under load). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
