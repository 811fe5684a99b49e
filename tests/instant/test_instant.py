"""Instant personal models on the tiny model: family, generator fit and storage, the product path, bad input."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lorafleet.adapters import AdapterError, LoraAdapter, from_bytes
from lorafleet.base import load_base
from lorafleet.evaluation.gate import gate, promote
from lorafleet.evaluation.metrics import EvalSet, evaluate_revision
from lorafleet.evaluation.personas import get_persona
from lorafleet.instant import (
    DEFAULT_SPEC,
    ComboPersona,
    CorpusConfig,
    GeneratorMismatchError,
    InstantError,
    NoGeneratorError,
    build_corpus,
    commit_generator,
    create_from_profile,
    default_generator_ref,
    fit_generator,
    load_generator,
    read_examples,
    split_family,
)
from lorafleet.instant.corpus import cache_key
from lorafleet.instant.embed import MAX_EXAMPLES, profile_features_many
from lorafleet.instant.generator import INIT_SEED, Generator, flatten, layout_of
from lorafleet.registry import NotFoundError, Registry
from lorafleet.training.data import dataset_from_records
from lorafleet.training.jobs import JobQueue
from lorafleet.training.trainer import TrainConfig
from lorafleet.training.worker import Worker


@pytest.fixture(scope="module")
def tiny_base():
    return load_base("tiny")


@pytest.fixture()
def reg(tmp_path):
    r = Registry(f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "blobs"))
    yield r
    r.close()


@pytest.fixture(scope="module")
def generator(tiny_base) -> Generator:
    """A generator fitted on real profile features and synthetic adapters around the shared init (no training:
    the corpus path is tested on its own below)."""
    personas, _ = split_family(16, 0, seed=1)
    feats = profile_features_many(tiny_base, [(p.describe(), None) for p in personas]
                                  + [(p.describe(), p.data(2, 1)[0]) for p in personas])
    init = flatten(LoraAdapter.create(tiny_base, DEFAULT_SPEC, seed=INIT_SEED))
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(feats.shape[1], init.numel(), generator=g) * 1e-4
    thetas = init + (feats - feats.mean(0)) @ mix
    layout = layout_of(LoraAdapter.create(tiny_base, DEFAULT_SPEC, seed=INIT_SEED))
    return fit_generator(feats, thetas, spec=DEFAULT_SPEC, layout=layout, base_fingerprint=tiny_base.fingerprint,
                         corpus_digest="0" * 64, components=8, info={"personas": 16})


# -- the family ------------------------------------------------------------------------------------
def test_family_held_out_are_unseen_combinations_of_seen_habits():
    train, held = split_family(40, 6, seed=3)
    keys = {p.key for p in train}
    assert len(keys) == 40 and not keys & {p.key for p in held}
    seen = {(i, v) for p in train for i, v in enumerate(p.key) if v}
    for p in held:
        assert p.habits >= 2 and all((i, v) in seen for i, v in enumerate(p.key) if v)
    assert split_family(40, 6, seed=3) == (train, held)  # deterministic
    with pytest.raises(InstantError, match="combinations"):
        split_family(10_000, 1)


def test_family_answers_pass_their_own_checker_and_fail_others():
    p = ComboPersona(greeting="Hello friend!", signoff="Cheers, Sam", lowercase=True)
    train, evals = p.data(6, 3)
    assert {r["messages"][0]["content"] for r in train}.isdisjoint(r["messages"][0]["content"] for r in evals)
    for r in train + evals:
        assert p.check(r["messages"][1]["content"])
    assert p.describe() == ("always opens with the greeting 'Hello friend!', always ends with the sign-off "
                            "'Cheers, Sam' and writes in all lowercase")
    assert not p.check("Hello friend! Paris. Cheers, Sam")  # capitals break the lowercase habit
    assert p.component_rate("hello friend! paris.") == pytest.approx(2 / 3)
    with pytest.raises(InstantError, match="at least one habit"):
        ComboPersona()
    with pytest.raises(InstantError, match="not in the family"):
        ComboPersona(word="fabulous")


# -- the generator ---------------------------------------------------------------------------------
def test_fit_recovers_a_low_rank_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 12, generator=g)
    truth = torch.randn(12, 3, generator=g) @ torch.randn(3, 50, generator=g)
    theta = 0.5 + x @ truth
    layout = [["m", [1, 25], [25, 1]]]
    gen = fit_generator(x[:60], theta[:60], spec=DEFAULT_SPEC, layout=layout, base_fingerprint="f", corpus_digest="d",
                        components=4)
    err = (gen.predict(x[60:]) - theta[60:]).norm() / (theta[60:] - theta[60:].mean(0)).norm()
    assert err < 0.05
    scores = gen.info["val_relative_error"]
    assert str(gen.info["lambda"]) == min(scores, key=scores.get) and scores[str(gen.info["lambda"])] < 0.1
    with pytest.raises(InstantError, match="at least 3"):
        fit_generator(x[:2], theta[:2], spec=DEFAULT_SPEC, layout=layout, base_fingerprint="f", corpus_digest="d")
    # gain scales the predicted departure from the corpus mean, folded into the stored map
    doubled = fit_generator(x[:60], theta[:60], spec=DEFAULT_SPEC, layout=layout, base_fingerprint="f",
                            corpus_digest="d", components=4, gain=2.0)
    assert torch.allclose(doubled.predict(x[60:]), gen.mean + 2 * (gen.predict(x[60:]) - gen.mean), atol=1e-4)
    assert doubled.info["gain"] == 2.0
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(InstantError, match="gain"):
            fit_generator(x[:60], theta[:60], spec=DEFAULT_SPEC, layout=layout, base_fingerprint="f",
                          corpus_digest="d", gain=bad)


def test_validation_split_keeps_a_personas_rows_together():
    """Two profiles per persona share one target: split row by row, a validation row's twin sits in the fit and the
    ridge pick looks perfect on noise; split by persona (groups) it sees no signal (targets unrelated to features)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 100, generator=g).repeat_interleave(2, dim=0)  # each persona's two rows: the same features
    theta = torch.randn(40, 6, generator=g).repeat_interleave(2, dim=0)  # and the same target, unrelated to x
    layout = [["m", [1, 3], [3, 1]]]  # more features than rows: a weak ridge can memorise the fit's rows
    kw = {"spec": DEFAULT_SPEC, "layout": layout, "base_fingerprint": "f", "corpus_digest": "d", "components": 6}
    leaky = fit_generator(x, theta, **kw).info["val_relative_error"]
    grouped = fit_generator(x, theta, groups=torch.arange(40).repeat_interleave(2), **kw).info["val_relative_error"]
    assert min(leaky.values()) < 0.2 and min(grouped.values()) > 0.9
    with pytest.raises(InstantError, match="one group per row"):
        fit_generator(x, theta, groups=torch.arange(3), **kw)
    with pytest.raises(InstantError, match="3 distinct personas"):
        fit_generator(x, theta, groups=torch.arange(80) % 2, **kw)


def test_generator_blob_round_trips_and_is_never_servable(tiny_base, generator, reg):
    rev = commit_generator(reg, generator, default_generator_ref(tiny_base))
    assert rev.address == f"{default_generator_ref(tiny_base)}#1" and "live" in rev.aliases
    prov = rev.provenance
    assert prov.method == "instant-generator" and prov.base_fingerprint == tiny_base.fingerprint
    assert prov.dataset_digest == "0" * 64 and prov.hyperparams["components"] == 8
    loaded, _ = load_generator(reg, tiny_base)
    x = torch.randn(generator.feature_dim)
    assert torch.allclose(loaded.predict(x), generator.predict(x), atol=1e-5)
    with pytest.raises(AdapterError, match="does not exist in base"):
        from_bytes(reg.read_blob(rev.digest), tiny_base)  # the generator blob cannot be loaded as an adapter


def test_generated_adapter_fits_the_base_and_differs_by_profile(tiny_base, generator):
    a, seconds = generator.generate(tiny_base, "always ends with the sign-off 'Best, Kim'")
    b, _ = generator.generate(tiny_base, "writes in all lowercase")
    a.check_fits(tiny_base)
    assert 0 < seconds < 5
    assert not torch.allclose(flatten(a), flatten(b))
    c, _ = generator.generate(tiny_base, "writes in all lowercase", read_examples(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}\n'))
    assert not torch.allclose(flatten(b), flatten(c))  # examples change the embedding


# -- the product path ------------------------------------------------------------------------------
def test_create_from_profile_commits_revision_one_then_gated_then_warm_started(tiny_base, generator, reg):
    commit_generator(reg, generator, default_generator_ref(tiny_base))
    out = create_from_profile(reg, tiny_base, "acme/ann/style", "always ends with the sign-off '— Ahab'")
    rev = out.revision
    assert rev.number == 1 and rev.aliases == ["candidate"] and rev.provenance.method == "generated"
    hp = rev.provenance.hyperparams
    assert hp["generator"] == f"{default_generator_ref(tiny_base)}#1" and hp["generation_seconds"] == pytest.approx(
        out.seconds, abs=1e-3)
    assert hp["examples"] == 0 and len(hp["profile_digest"]) == 64
    from_bytes(reg.read_blob(rev.digest), tiny_base)  # a servable adapter
    # evaluated and gated like any other revision
    persona = get_persona("ahab")
    evaluate_revision(reg, rev.address, tiny_base, EvalSet(f"persona:{persona.name}", persona.data().eval[:2],
                                                            persona=persona), max_new_tokens=4,
                      probe_enabled=False)
    decision = gate(reg, rev.address)
    assert reg.resolve(rev.address).provenance.metrics["gate"]["decision"] in ("promoted", "refused")
    if not decision.promoted:
        promote(reg, rev.address, force=True, reason="test: warm start from the generated revision")
    # training warm-starts revision #2 from it
    queue = JobQueue(reg)
    records = persona.data().train[:4]
    job = queue.submit("acme/ann/style", dataset_from_records(records, "sft"), DEFAULT_SPEC,
                       TrainConfig(steps=1, lr=1e-3, batch_size=1, max_len=64))
    Worker(reg, tiny_base).run()
    second = reg.resolve("acme/ann/style#2")
    assert queue.get(job.id).result_number == 2
    assert second.provenance.parent == 1 and second.provenance.parent_digest == rev.digest


def _nothing_committed(reg, ref):
    with pytest.raises(NotFoundError):
        reg.history(ref)


@pytest.mark.parametrize(("profile", "examples", "match"), [
    ("", None, "profile is empty"),
    ("   ", None, "profile is empty"),
    ("ok", [{"messages": [{"role": "assistant", "content": "x"}]}] * (MAX_EXAMPLES + 1), "at most 8"),
    ("ok", [{"messages": [{"role": "user", "content": "x"}]}], "no non-empty assistant turn"),
    ("x" * 3000, None, "at most 2000"),
])
def test_bad_profile_is_refused_and_nothing_committed(tiny_base, generator, reg, profile, examples, match):
    commit_generator(reg, generator, default_generator_ref(tiny_base))
    with pytest.raises(InstantError, match=match):
        create_from_profile(reg, tiny_base, "acme/bob/style", profile, examples)
    _nothing_committed(reg, "acme/bob/style")


def test_generator_for_another_base_is_refused(tiny_base, generator, reg):
    other = load_base("tiny:1")
    assert other.fingerprint != tiny_base.fingerprint
    ref = default_generator_ref(tiny_base)
    commit_generator(reg, generator, ref)
    with pytest.raises(GeneratorMismatchError, match="made for base"):
        create_from_profile(reg, other, "acme/cy/style", "writes in all lowercase", generator=ref)
    with pytest.raises(GeneratorMismatchError, match="made for base"):
        generator.generate(other, "writes in all lowercase")
    with pytest.raises(NoGeneratorError, match="no generator"):
        create_from_profile(reg, other, "acme/cy/style", "writes in all lowercase")
    _nothing_committed(reg, "acme/cy/style")


def test_refuses_an_adapter_that_has_revisions_and_a_non_generator(tiny_base, generator, reg):
    ref = default_generator_ref(tiny_base)
    commit_generator(reg, generator, ref)
    create_from_profile(reg, tiny_base, "acme/dee/style", "writes in all lowercase")
    with pytest.raises(InstantError, match="already has 1 revision"):
        create_from_profile(reg, tiny_base, "acme/dee/style", "writes in all lowercase")
    with pytest.raises(InstantError, match="not a generator"):
        create_from_profile(reg, tiny_base, "acme/eve/style", "writes in all lowercase", generator="acme/dee/style#1")
    assert len(reg.history("acme/dee/style")) == 1
    _nothing_committed(reg, "acme/eve/style")
    with pytest.raises(InstantError, match="line 1 is not JSON"):
        read_examples("{nope")


# -- the corpus ------------------------------------------------------------------------------------
def test_corpus_is_trained_packed_and_cached_by_digest(tiny_base, tmp_path):
    personas, _ = split_family(3, 0, seed=5)
    cfg = CorpusConfig(spec=DEFAULT_SPEC, steps=1, pack=3, n_train=2, k=1, max_len=192)
    first = build_corpus(tiny_base, personas, cfg, tmp_path)
    init = flatten(LoraAdapter.create(tiny_base, DEFAULT_SPEC, seed=INIT_SEED))
    assert first.cached == 0 and first.thetas.shape == (3, init.numel()) and first.features.shape[0] == 6
    assert not torch.allclose(first.thetas[0], init)  # trained away from the shared init
    assert torch.equal(first.features[1, -1:], torch.ones(1)) and first.features[0, -1] == 0  # with / without examples
    again = build_corpus(tiny_base, personas, cfg, tmp_path)
    assert again.cached == 3 and again.digest == first.digest and torch.equal(again.thetas, first.thetas)
    smaller = build_corpus(tiny_base, personas[:1], cfg, tmp_path)  # shares the cached persona
    assert smaller.digest != first.digest and smaller.cached == 1
    changed = build_corpus(tiny_base, personas[:1], replace(cfg, lr=1e-3), tmp_path)  # other settings: retrained
    assert changed.cached == 0
    manifest = json.loads((tmp_path / cache_key(tiny_base, cfg) / f"corpus-{first.digest[:16]}.json").read_text())
    assert manifest["base"] == tiny_base.fingerprint and len(manifest["personas"]) == 3


def _run_quick(script: str, tmp_path) -> str:
    """Run ``benchmarks/<script> --quick`` in a scratch home and corpus cache; returns the result file's text."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "result.md"
    run = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--quick", "--out", str(out),
                          "--cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LORAFLEET_HOME": str(tmp_path / "home")})
    assert run.returncode == 0, run.stderr[-2000:]
    return out.read_text()


def test_benchmark_quick_runs(tmp_path):
    text = _run_quick("instant.py", tmp_path)
    for row in ("| base |", "| base + in-context profile |", "| generated (profile) |", "generated + 2 steps",
                "from scratch, 2 steps", "## Goals"):
        assert row in text


def test_tuning_benchmark_quick_runs(tmp_path):
    text = _run_quick("instant_tune.py", tmp_path)
    assert "| trained corpus adapters |" in text and "## Verdict" in text
    assert text.count("| generated (description) |") == 4  # 2 component counts x 2 gains
