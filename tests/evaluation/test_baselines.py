"""The in-context and retrieval baselines: prompt building, BM25 selection, token counts, scoring per condition."""

from __future__ import annotations

import pytest

from lorafleet.evaluation.baselines import (
    CONDITIONS,
    BaselineConfig,
    Profile,
    Retriever,
    compare_conditions,
    condition_prompts,
    evaluate_conditions,
    in_context_messages,
    parse_conditions,
    profile_system_prompt,
    prompt_tokens,
)
from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.personas import Persona, get_persona


def _rec(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


EXAMPLES = [
    _rec("What should I cook for a picnic?", "Try a couscous salad."),
    _rec("Where can I buy fresh bread nearby?", "The bakery by the market."),
    _rec("How do I reverse a string in code?", "Use chars().rev()."),
    _rec("Suggest a dinner for a cold winter evening.", "A lentil stew."),
    _rec("Write a birthday card for my aunt.", "Happy birthday! Love, Priya"),
]


def test_in_context_profile_is_system_prompt_plus_first_k_examples():
    msgs = in_context_messages("What is for lunch?", EXAMPLES, description="is vegetarian", k=2)
    assert msgs[0]["role"] == "system" and "is vegetarian" in msgs[0]["content"]
    assert [m["content"] for m in msgs[1:5]] == ["What should I cook for a picnic?", "Try a couscous salad.",
                                                  "Where can I buy fresh bread nearby?", "The bakery by the market."]
    assert msgs[-1] == {"role": "user", "content": "What is for lunch?"} and len(msgs) == 6


def test_bm25_retrieves_the_most_similar_examples():
    r = Retriever(EXAMPLES, k=2)
    top = r.top("Any idea for dinner on a cold evening?")
    assert top[0] == 3  # the winter-evening dinner shares the most words
    assert r.top("reverse a string", k=1) == [2]
    msgs = r.messages("reverse a string please")
    assert msgs[-1]["content"] == "reverse a string please"
    assert msgs[-3]["content"] == "How do I reverse a string in code?"  # the best match sits next to the question
    assert not any(m["role"] == "system" for m in msgs)  # retrieval carries no description


def test_conditions_share_the_held_out_prompts():
    p = get_persona("veggie")
    d = p.data()
    prompts = d.eval_prompts
    rows = {c: condition_prompts(c, prompts, d.train, description=p.describe(), k=4) for c in CONDITIONS}
    for c, msgs in rows.items():
        assert [m[-1]["content"] for m in msgs] == prompts, c
    assert rows["base"] == rows["adapter"] and rows["in_context"] == rows["adapter_in_context"]
    assert all(len(m) == 1 for m in rows["base"])
    assert all(len(m) == 10 for m in rows["in_context"]) and all(len(m) == 9 for m in rows["retrieval"])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: profile_system_prompt("  "), "non-empty user description"),
        (lambda: in_context_messages("q", EXAMPLES, description="x", k=6), r"k=6 is larger than the user's 5"),
        (lambda: in_context_messages("q", EXAMPLES, description="x", k=0), r"k must be an integer in 1\.\.32"),
        (lambda: in_context_messages("q", [], description="x", k=1), "no training examples"),
        (lambda: Retriever(EXAMPLES, k=9), "larger than the user's 5"),
        (lambda: Retriever([{"messages": [{"role": "user", "content": "hi"}]}], k=1), "no user and assistant turn"),
        (lambda: condition_prompts("oracle", ["q"], EXAMPLES), "unknown condition 'oracle'"),
        (lambda: condition_prompts("in_context", ["q"], EXAMPLES), "needs the user's description"),
    ],
)
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(EvaluationError, match=match):
        call()


def test_prompt_tokens_grow_with_the_profile(tiny_base):
    plain = prompt_tokens(tiny_base.tokenizer, [{"role": "user", "content": "What is for lunch?"}])
    profiled = prompt_tokens(tiny_base.tokenizer, in_context_messages("What is for lunch?", EXAMPLES,
                                                                      description="is vegetarian", k=4))
    assert 0 < plain < profiled


def test_evaluate_conditions_scores_each_condition_with_the_checker(tiny_base):
    """A backend that follows a system prompt when there is one: only the profiled rows pass the sign-off."""
    ahab = get_persona("ahab")
    d = ahab.data()

    def follows_the_profile(base, chats, adapters, max_new_tokens):
        return [("Yes. — Ahab" if chat[0]["role"] == "system" else "Yes.") for chat in chats]

    out = evaluate_conditions(tiny_base, ahab, d.train, d.eval[:3], conditions=("base", "in_context", "retrieval"),
                              backend=follows_the_profile)
    assert out["in_context"]["adherence"] == 1.0 and out["in_context"]["passed"] == 3
    assert out["base"]["adherence"] == 0.0 and out["retrieval"]["adherence"] == 0.0
    assert out["in_context"]["prompt_tokens"] > out["retrieval"]["prompt_tokens"] > out["base"]["prompt_tokens"]


def test_evaluate_conditions_on_the_tiny_model(tiny_base):
    from lorafleet.adapters import LoraAdapter, LoraSpec

    p = get_persona("priya")
    d = p.data()
    adapter = LoraAdapter.create(tiny_base, LoraSpec(rank=2, alpha=4.0, target_modules="attention"), seed=0)
    out = evaluate_conditions(tiny_base, p, d.train, d.eval[:2], adapter=adapter, k=1, max_new_tokens=3)
    assert set(out) == set(CONDITIONS)
    assert all(r["count"] == 2 and len(r["responses"]) == 2 for r in out.values())
    assert out["adapter"]["prompt_tokens"] == out["base"]["prompt_tokens"]
    with pytest.raises(EvaluationError, match="need the user's adapter"):
        evaluate_conditions(tiny_base, p, d.train, d.eval[:2], conditions=("adapter",))


def _tiny_items(tiny_base, n_eval=2, conditions=None):
    from lorafleet.adapters import LoraAdapter, LoraSpec
    from lorafleet.evaluation.metrics import EvalSet

    p = get_persona("priya")
    p = Persona(p.name, p.habit, p.params, seed=p.seed, n_train=p.n_train, n_eval=n_eval)
    adapter = LoraAdapter.create(tiny_base, LoraSpec(rank=2, alpha=4.0, target_modules="attention"), seed=0,
                                 init="random")
    item = {"eval_set": EvalSet.from_persona(p), "profile": Profile.from_persona(p), "adapter": adapter}
    if conditions:
        item["conditions"] = conditions
    return p, item


def test_compare_conditions_reports_every_column_on_the_engine(tiny_base):
    _, item = _tiny_items(tiny_base)
    (report,) = compare_conditions(tiny_base, [item], BaselineConfig(conditions=CONDITIONS, k=1, serve_tokens=2),
                                   max_new_tokens=3, probe_max_new_tokens=3)
    assert report["k"] == 1 and list(report["rows"]) == list(CONDITIONS)
    for c, row in report["rows"].items():
        assert row["count"] == 2 and 0.0 <= row["adherence"] <= 1.0, c
        assert row["eval_loss"] > 0 and 0.0 <= row["probe_retention"] <= 1.0, c
        assert row["tok_s"] > 0 and row["ttft_ms"] > 0, c
    rows = report["rows"]
    assert rows["in_context"]["prompt_tokens"] == rows["adapter_in_context"]["prompt_tokens"] > rows["adapter"]["prompt_tokens"]
    assert report["token_ratio"] == pytest.approx(rows["in_context"]["prompt_tokens"] / rows["base"]["prompt_tokens"], abs=0.01)
    # the in-context examples' answers are not scored: only the held-out answer is, so the loss stays comparable
    assert abs(rows["in_context"]["eval_loss"] - rows["base"]["eval_loss"]) < 1.0


def test_compare_conditions_reuses_the_evaluation_numbers(tiny_base):
    _, item = _tiny_items(tiny_base, conditions=("base", "adapter"))
    item["metrics"] = {"eval_digest": "d", "adherence": 0.75, "base_adherence": 0.25, "eval_loss": 1.5,
                       "base_eval_loss": 2.5, "probe_accuracy": 0.5, "base_probe_accuracy": 0.6, "probe_retention": 0.8}
    calls = []

    def backend(base, prompts, adapters, max_new_tokens):
        calls.append(len(prompts))
        return ["x"] * len(prompts)

    (report,) = compare_conditions(tiny_base, [item], BaselineConfig(serving=False), backend=backend)
    assert calls == []  # nothing generated: base and adapter come from the evaluation
    assert report["rows"]["adapter"]["adherence"] == 0.75 and report["rows"]["base"]["eval_loss"] == 2.5
    assert report["rows"]["adapter"]["probe_retention"] == 0.8 and report["rows"]["base"]["probe_retention"] == 1.0


def test_k_is_lowered_to_fit_only_when_asked(tiny_base):
    _, item = _tiny_items(tiny_base, conditions=("in_context",))
    with pytest.raises(EvaluationError, match="needs .* positions .* but the base holds 512; lower k"):
        compare_conditions(tiny_base, [item], BaselineConfig(conditions=("in_context",), k=4, probe=False,
                                                             serving=False), max_new_tokens=2)
    (report,) = compare_conditions(tiny_base, [item], BaselineConfig(conditions=("in_context",), k=4, probe=False,
                                                                     serving=False, fit_k=True), max_new_tokens=2)
    assert 1 <= report["k"] < 4


@pytest.mark.parametrize(("make", "match"), [
    (lambda: Profile("   ", (EXAMPLES[0],)), "profile is empty"),
    (lambda: Profile("is vegetarian", ()), "no training examples"),
    (lambda: Profile("is vegetarian", tuple(EXAMPLES)).check_k(6), "k=6 is larger than the user's 5"),
    (lambda: BaselineConfig(k=0), "k must be an integer"),
    (lambda: BaselineConfig(conditions=("nope",)), "unknown baseline condition"),
    (lambda: parse_conditions("base,prompt"), "unknown baseline"),
])
def test_bad_baseline_input_is_a_clear_error(make, match):
    with pytest.raises(EvaluationError, match=match):
        make()


def test_parse_conditions():
    assert parse_conditions(None) == ("base", "in_context", "adapter")
    assert parse_conditions("all") == CONDITIONS and parse_conditions("none") == ()
    assert parse_conditions("adapter, in-context,adapter") == ("in_context", "adapter")


def test_personal_vs_prompt_benchmark_quick(tmp_path):
    """The benchmark end to end on the tiny model (train, five conditions, seeds, engine serving cost); --quick
    writes nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "personal_vs_prompt.py"), "--quick"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for label in ("base + in-context: adherence", "base + retrieval (BM25): adherence", "adapter + in-context: adherence",
                  "tok/s, TTFT", "fewer prompt tokens", "adherence per persona"):
        assert label in out.stdout
