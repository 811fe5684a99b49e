"""Metrics on the tiny model: finite values, the base side by side, stored on the revision."""

from __future__ import annotations

import math

import pytest

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.evaluation import metrics
from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.metrics import EvalSet, eval_losses, eval_set_for, evaluate_adapters, evaluate_revision
from lorafleet.evaluation.personas import Persona
from lorafleet.registry import Provenance
from lorafleet.training.data import dataset_from_records
from lorafleet.training.trainer import sft_eval_loss

SMALL = Persona("small", "signoff", {"text": "— Ahab"}, seed=0, n_train=4, n_eval=3)


@pytest.fixture(scope="module")
def adapters(tiny_base):
    spec = LoraSpec(rank=4, target_modules="all")
    return [LoraAdapter.create(tiny_base, spec, seed=s, init="random") for s in (0, 1)]


def _gold_backend(eval_set: EvalSet):
    """A fake generation backend: adapters answer with the eval set's targets, the base with 'no'."""
    gold = {str(p): r["messages"][-1]["content"] for p, r in zip(eval_set.prompts, eval_set.records, strict=True)}

    def backend(base, prompts, adapters, max_new_tokens):
        # evaluation hands every prompt over as chat messages; the user's text is the last one
        texts = [p[-1]["content"] for p in prompts]
        return [gold.get(t, "Paris. — Ahab") if a is not None else "no" for t, a in zip(texts, adapters, strict=True)]

    return backend


def test_eval_losses_match_the_trainers_eval_loss(tiny_base, adapters):
    records = SMALL.data().eval
    ours = eval_losses(tiny_base, [adapters[0], None, adapters[1]], [records, records, records])
    ds = dataset_from_records(records, "sft")
    assert ours[0] == pytest.approx(sft_eval_loss(tiny_base, adapters[0], ds), rel=1e-4)
    assert ours[1] == pytest.approx(sft_eval_loss(tiny_base, None, ds), rel=1e-4)
    assert ours[2] == pytest.approx(sft_eval_loss(tiny_base, adapters[1], ds), rel=1e-4)


def test_perplexities_finite_and_base_first_class(tiny_base, adapters):
    ppl = metrics.perplexities(tiny_base, [None, adapters[0]], texts=("Hello world. This is text.",))
    assert all(math.isfinite(x) and x > 1 for x in ppl)


def test_perplexity_texts_keep_the_tokenizers_special_tokens(tiny_base, monkeypatch):
    """A tokenizer that starts documents with a BOS (Gemma's) gets it in the probe's plain texts too: without it
    Gemma-3-270M's perplexity was 262 instead of 15 and every ratio against it was measured off-distribution."""
    import dataclasses

    real, bos, seen = tiny_base.tokenizer, 1, []

    class WithBos:  # the tiny tokenizer, plus a BOS where the tokenizer adds its special tokens
        def __call__(self, text, add_special_tokens=True, **kw):
            ids = real(text, add_special_tokens=False, **kw)["input_ids"]
            return {"input_ids": [bos, *ids] if add_special_tokens else ids}

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(metrics, "_mean_nll", lambda base, adapters, rows, n: seen.extend(rows) or [2.0] * n)
    ppl = metrics.perplexities(dataclasses.replace(tiny_base, tokenizer=WithBos()), [None], texts=("Hello world.",))
    assert seen and seen[0][1][0] == bos and ppl == [math.exp(2.0)]


def test_adherence_uses_the_personas_checker(tiny_base, adapters):
    es = EvalSet.from_persona(SMALL)
    (m,) = evaluate_adapters(tiny_base, [adapters[0]], [es], max_new_tokens=4, backend=_gold_backend(es))
    assert m["adherence"] == 1.0 and m["base_adherence"] == 0.0
    assert m["samples"][0]["ok"] is True
    assert m["probe_retention"] == 1.0  # the base (answering "no") gets nothing right


def test_evaluate_many_adapters_real_generation(tiny_base, adapters):
    sets = [EvalSet.from_persona(SMALL), EvalSet.from_persona(Persona("w", "tool_call", n_train=4, n_eval=4))]
    ms = evaluate_adapters(tiny_base, adapters, sets, max_new_tokens=3, probe_max_new_tokens=3)
    for m, es in zip(ms, sets, strict=True):
        assert m["eval_digest"] == es.digest and m["eval_count"] == len(es)
        for key in ("eval_loss", "base_eval_loss", "probe_ppl", "base_probe_ppl", "probe_ppl_ratio"):
            assert math.isfinite(m[key]), key
        for key in ("adherence", "base_adherence", "probe_accuracy", "probe_retention", "probe_agreement"):
            assert 0.0 <= m[key] <= 1.0, key
    assert ms[0]["persona_spec"] == SMALL.to_dict()
    assert ms[0]["base_eval_loss"] != ms[1]["base_eval_loss"]  # each set has its own base numbers


def test_evaluate_revision_stores_metrics(registry, tiny_base, adapters):
    rev = registry.commit("acme/alice/a", to_bytes(adapters[0]), Provenance(base_fingerprint=tiny_base.fingerprint))
    es = EvalSet.from_persona(SMALL)
    info, m = evaluate_revision(registry, rev.address, tiny_base, es, max_new_tokens=4, backend=_gold_backend(es))
    stored = registry.resolve(rev.address).provenance.metrics
    assert stored["adherence"] == 1.0 and stored["persona"] == "small" and stored["eval_digest"] == es.digest
    assert info.provenance.metrics == stored
    assert math.isfinite(stored["eval_loss"]) and math.isfinite(stored["probe_ppl_ratio"])
    # the revision remembers its persona: the next eval finds it without being told
    assert eval_set_for(info).digest == es.digest


def test_eval_file_has_no_checker(tmp_path, tiny_base, adapters):
    path = tmp_path / "held.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}\n')
    es = eval_set_for(eval_file=path)
    (m,) = evaluate_adapters(tiny_base, [adapters[0]], [es], max_new_tokens=2, probe_enabled=False)
    assert m["adherence"] is None and m["eval_set"] == "file:held.jsonl" and m["eval_file"] == str(path.resolve())
    assert m["probe_ppl_ratio"] is None and math.isfinite(m["eval_loss"])  # None overwrites stale probe numbers


def test_eval_set_errors(registry, tiny_base, adapters):
    rev = registry.commit("acme/alice/a", to_bytes(adapters[0]), Provenance(base_fingerprint=tiny_base.fingerprint))
    with pytest.raises(EvaluationError, match="records no persona or eval set"):
        eval_set_for(rev)
    with pytest.raises(EvaluationError, match="either a persona or an eval file"):
        eval_set_for(persona="ahab", eval_file="x.jsonl")
    assert eval_set_for(rev, persona="ahab").name == "persona:ahab"


def test_probe_scoring():
    from lorafleet.evaluation import probe

    n = len(probe.PROBE_QUESTIONS)
    right = [k[0] for _, k in probe.PROBE_QUESTIONS]
    m = probe.score_answers(right, right)
    assert m["probe_accuracy"] == m["probe_retention"] == m["probe_agreement"] == 1.0 and m["probe_lost"] == []
    half = right[: n // 2] + ["no idea"] * (n - n // 2)
    m = probe.score_answers(half, right)
    assert m["probe_retention"] == pytest.approx((n // 2) / n) and len(m["probe_lost"]) == 5
    assert probe.token_f1("The cat sat.", "the cat sat") == 1.0 and probe.token_f1("a", "b") == 0.0
