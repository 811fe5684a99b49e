"""The in-context and retrieval baselines: prompt building, BM25 selection, token counts, scoring per condition."""

from __future__ import annotations

import pytest

from lorafleet.evaluation.baselines import (
    CONDITIONS,
    Retriever,
    condition_prompts,
    evaluate_conditions,
    in_context_messages,
    profile_system_prompt,
    prompt_tokens,
)
from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.personas import get_persona


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


def test_adapter_vs_prompt_benchmark_tiny_smoke_run(tmp_path):
    """The benchmark end to end on the tiny model (train, five conditions, engine serving cost); writes nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "adapter_vs_prompt.py"), "--tiny"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for label in ("base + in-context", "base + retrieval (BM25)", "adapter + in-context", "engine TTFT ms"):
        assert label in out.stdout
