"""OpenAI request parameters with the official `openai` client: n, seed, stop, max_completion_tokens,
logprobs / top_logprobs — and every parameter the server does not implement refused with a 400 naming it.
Structured output (response_format, tools) is in test_openai_structured.py."""

from __future__ import annotations

import math

import openai
import pytest
import torch

from lorafleet.serving.params import SamplingParams

MSGS = [{"role": "user", "content": "Tell me a story."}]
MODEL = "acme/alice/style"


@pytest.fixture(scope="module")
def c(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["acme"], max_retries=0, timeout=60)


def test_n_choices_and_seed(c):
    out = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=1.0, n=3, seed=7)
    assert [ch.index for ch in out.choices] == [0, 1, 2]
    again = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=1.0, n=3, seed=7)
    texts = [ch.message.content for ch in out.choices]
    assert texts == [ch.message.content for ch in again.choices]  # same seed, same samples
    assert len(set(texts)) > 1  # choice i samples with seed + i
    assert out.usage.completion_tokens == 3 * 8
    other = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=1.0, seed=8)
    assert other.choices[0].message.content == texts[1]  # choice 1 of seed 7 is seed 8


def test_stop_and_max_completion_tokens(server, c):
    full = c.chat.completions.create(model=MODEL, messages=MSGS, max_completion_tokens=12, temperature=0)
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip()
    cut = c.chat.completions.create(model=MODEL, messages=MSGS, max_completion_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_chat_logprobs_match_a_full_forward(server, c):
    out = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, temperature=0, logprobs=True,
                                    top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert "".join(t.token for t in content) == out.choices[0].message.content
    assert len(content) == out.usage.completion_tokens == 6
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        alts = [a.logprob for a in t.top_logprobs]
        assert alts == sorted(alts, reverse=True)
        assert t.logprob == pytest.approx(alts[0], abs=1e-4)  # greedy: the chosen token is the most likely
        assert t.bytes == list(t.token.encode())
    # independently: the probabilities of the engine's own tokens under the adapter (sum over vocab = 1)
    assert sum(math.exp(a.logprob) for a in content[0].top_logprobs) <= 1.0 + 1e-6
    plain = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None
    base = c.chat.completions.create(model=server.base.name, messages=MSGS, max_tokens=6, temperature=0, logprobs=True)
    assert base.choices[0].logprobs.content[0].logprob != content[0].logprob  # the adapter changes them


def test_completion_logprobs(server, c):
    out = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and len(lp.token_logprobs) == 5
    assert all(len(d) <= 2 for d in lp.top_logprobs) and lp.text_offset[0] == 0
    # the reported log-prob of the first token equals a direct forward pass of the tiny base + adapter
    from lorafleet.adapters import LoraHost, from_bytes
    from lorafleet.adapters.slots import StackedWeights

    adapter = from_bytes(server.registry.read_blob(server.digests[MODEL]), server.base)
    tok = server.base.tokenizer
    ids = tok("Once upon", add_special_tokens=False)["input_ids"]
    first = server.engine.generate(["Once upon"], [server.digests[MODEL]], SamplingParams(max_tokens=1))[0].token_ids
    with torch.no_grad(), LoraHost.attach(server.base.model).route(StackedWeights([adapter]), [0]):
        logits = server.base.model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert lp.token_logprobs[0] == pytest.approx(torch.log_softmax(logits, -1)[first[0]].item(), abs=1e-4)


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools; the rest of tools / response_format:
    # tests/api/test_openai_structured.py
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"logit_bias": {"50": 10}}, "logit_bias"),
    ({"n": 2, "stream": True}, "n"),
    ({"logprobs": True, "stream": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
    ({"extra_body": {"top_k": 5}}, "top_k"),
    ({"n": 9}, "n"),
])
def test_unsupported_parameters_are_400_naming_them(c, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4, **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and param in err.value.body["message"]


def test_no_op_values_are_accepted(c):
    out = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3, presence_penalty=0, frequency_penalty=0,
                                    response_format={"type": "text"}, tool_choice="none", temperature=0)
    assert out.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=MODEL, prompt="x", max_tokens=3, echo=True)
    assert err.value.body["param"] == "echo"
