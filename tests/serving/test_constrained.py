"""Constrained decoding in the engine: a row with a grammar and rows without one decode in the same steps; the
free rows' tokens are exactly what they are alone; the grammar masks the logits (EOS only where it accepts), the
matcher follows the tokens, and a complete grammar ends the row."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from lorafleet.serving.constrain import GrammarCompiler, GrammarError, json_grammar, mask_logits
from lorafleet.serving.params import SamplingParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "tag"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "tag": {"type": "string", "pattern": "^[a-z]{1,6}$"}}}


def test_constrained_and_free_rows_share_steps_and_free_rows_are_unchanged(make_engine, blobs, adapters):
    engine = make_engine(blobs, max_batch=8, max_active=2, max_cached=4)
    digest = blobs.put(adapters[2])  # already there: its digest
    grammar = json_grammar(SCHEMA)
    prompts = ["Tell me", "Once upon a time", "JSON please", "A list"]
    free = [SamplingParams(max_tokens=24, ignore_eos=True), SamplingParams(max_tokens=20, temperature=0.9, seed=5)]
    alone = [engine.generate([prompts[1]], [digest], free[0])[0], engine.generate([prompts[3]], None, free[1])[0]]
    steps0 = engine.metrics.snapshot()["counters"]["decode_steps"]
    masks0 = engine.metrics.snapshot()["histograms"]["constraint_mask"]["count"]
    together = engine.generate(
        prompts, [None, digest, digest, None],
        [SamplingParams(max_tokens=120, grammar=grammar), free[0],
         SamplingParams(max_tokens=120, temperature=1.0, seed=11, grammar=grammar), free[1]])
    snap = engine.metrics.snapshot()
    steps = snap["counters"]["decode_steps"] - steps0
    # one prefill for the four, then one decode step per token of the longest: every step had all running rows
    assert steps == max(r.completion_tokens for r in together) - 1
    assert snap["histograms"]["constraint_mask"]["count"] - masks0 >= 1 + max(
        together[0].completion_tokens, together[2].completion_tokens) - 1
    for got, want in zip((together[1], together[3]), alone, strict=True):
        assert got.token_ids == want.token_ids and got.text == want.text
    for r in (together[0], together[2]):
        assert r.finish_reason == "stop" and r.error is None
        jsonschema.validate(json.loads(r.text), SCHEMA)
        assert not set(r.token_ids) & engine.eos_ids  # ended by the complete grammar, not by an EOS token
    assert not together[1].text.startswith("{")  # the free rows were not masked


def test_required_call_over_several_tools(make_engine, blobs):
    from lorafleet.api.structured import parse_tool_calls, tool_plan

    tools = [{"type": "function", "function": {"name": n, "parameters": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"],
        "additionalProperties": False}}}
        for n in ("alpha", "beta")]
    plan = tool_plan(tools, "required", None)
    engine = make_engine(blobs)
    out = engine.generate(["Call something", "Now"], None,
                          [SamplingParams(max_tokens=80, grammar=plan.grammar),
                           SamplingParams(max_tokens=80, temperature=1.0, seed=2, grammar=plan.grammar)])
    for r in out:
        content, [call] = parse_tool_calls(r.text, plan)
        assert content is None and call["function"]["name"] in ("alpha", "beta")
        assert 0 <= json.loads(call["function"]["arguments"])["x"] <= 9


def test_mask_allows_eos_only_where_the_grammar_accepts(base):
    tok = base.tokenizer
    vocab = base.model.get_input_embeddings().num_embeddings
    eos = tok.eos_token_id
    c = GrammarCompiler(tok, vocab, [eos]).compile(json_grammar({"type": "object", "properties": {}}))
    logits = torch.zeros(2, vocab)
    masked, seconds = mask_logits(logits, [c, None])
    assert seconds >= 0 and torch.equal(masked[1], logits[1])  # the free row is untouched
    allowed = torch.isfinite(masked[0]).nonzero().flatten().tolist()
    assert tok.decode(allowed).strip() == "{" and eos not in allowed  # the object must open; no EOS yet
    for t in tok("{}", add_special_tokens=False)["input_ids"]:
        assert c.advance(t)
    assert c.accepting and c.complete
    allowed = torch.isfinite(mask_logits(logits, [c])[0][0]).nonzero().flatten().tolist()
    assert allowed == [eos]  # complete: only the end of sequence may follow
    assert not c.advance(tok("x", add_special_tokens=False)["input_ids"][0])  # a refused token is an error state
    n = GrammarCompiler(tok, vocab, [eos]).compile(json_grammar({"type": "integer"}))
    for t in tok("12", add_special_tokens=False)["input_ids"]:
        assert n.advance(t)
    allowed = torch.isfinite(mask_logits(torch.zeros(1, vocab), [n])[0][0]).nonzero().flatten().tolist()
    assert n.accepting and not n.complete and eos in allowed and tok("3", add_special_tokens=False)["input_ids"][0] in allowed
    assert n.advance(eos)  # accepting: the end of sequence is a legal token


def test_bad_grammars_are_refused_at_submit(make_engine, blobs):
    engine = make_engine(blobs)
    with pytest.raises(GrammarError, match="does not compile"):
        engine.submit("hi", None, SamplingParams(grammar='{"grammars": [{"lark_grammar": "start: ("}]}'))
    with pytest.raises(ValueError, match="SamplingParams.grammar"):
        SamplingParams(grammar="")
    assert engine.metrics.snapshot()["counters"]["requests_submitted"] == 0
    with pytest.raises(GrammarError, match="invalid JSON schema at properties/a/type"):
        json_grammar({"type": "object", "properties": {"a": {"type": 7}}})
    with pytest.raises(GrammarError, match="invalid JSON schema"):
        json_grammar({"$schema": 5})
    with pytest.raises(GrammarError, match="not supported for constrained decoding: Unimplemented keys"):
        json_grammar({"not": {}})  # valid JSON Schema the grammar compiler lacks
