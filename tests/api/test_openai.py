"""The official `openai` client against a running server: chat, streaming, tenants in parallel, isolation."""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from lorafleet.serving.params import SamplingParams


def client(server, who: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys[who], max_retries=0, timeout=60)


def direct(server, model: str, prompt_messages, max_tokens=8) -> str:
    digest = server.digests.get(model)
    return server.engine.generate([prompt_messages], [digest], SamplingParams(max_tokens=max_tokens))[0].text


MSGS = [{"role": "user", "content": "Say something nice."}]


def test_chat_equals_engine_direct(server):
    out = client(server, "acme").chat.completions.create(model="acme/alice/style", messages=MSGS, max_tokens=8,
                                                         temperature=0)
    assert out.choices[0].message.content == direct(server, "acme/alice/style", MSGS)
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 0
    assert out.choices[0].finish_reason == "length"


def test_alias_and_revision_addressing_and_base(server):
    c = client(server, "acme")
    by_live = c.chat.completions.create(model="acme/alice/style", messages=MSGS, max_tokens=6, temperature=0)
    by_num = c.chat.completions.create(model="acme/alice/style#1", messages=MSGS, max_tokens=6, temperature=0)
    by_alias = c.chat.completions.create(model="acme/alice/style@candidate", messages=MSGS, max_tokens=6, temperature=0)
    base = c.chat.completions.create(model=server.base.name, messages=MSGS, max_tokens=6, temperature=0)
    assert by_live.choices[0].message.content == by_num.choices[0].message.content == by_alias.choices[0].message.content
    assert base.choices[0].message.content == direct(server, "base", MSGS, 6)
    assert base.choices[0].message.content != by_live.choices[0].message.content


def test_streaming_matches_non_streaming(server):
    c = client(server, "acme")
    full = c.chat.completions.create(model="acme/bob/style", messages=MSGS, max_tokens=10, temperature=0)
    chunks = list(c.chat.completions.create(model="acme/bob/style", messages=MSGS, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]


def test_completions_route(server):
    c = client(server, "acme")
    out = c.completions.create(model="acme/alice/style", prompt="Once upon", max_tokens=5, temperature=0)
    assert out.choices[0].text == direct(server, "acme/alice/style", "Once upon", 5)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="acme/alice/style", prompt="Once upon", max_tokens=5, temperature=0, stream=True) if ch.choices)
    assert streamed == out.choices[0].text


def test_two_tenants_in_parallel_get_their_own_adapter(server):
    jobs = [("acme", "acme/alice/style"), ("globex", "globex/gina/style")] * 4
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda j: client(server, j[0]).chat.completions.create(
            model=j[1], messages=MSGS, max_tokens=8, temperature=0).choices[0].message.content, jobs))
    for (_, model), text in zip(jobs, outs, strict=True):
        assert text == direct(server, model, MSGS)
    assert outs[0] != outs[1]


def test_cross_tenant_is_404_even_when_resident(server):
    acme, globex = client(server, "acme"), client(server, "globex")
    acme.chat.completions.create(model="acme/alice/style", messages=MSGS, max_tokens=2)  # now resident
    resident = [r["digest"] for r in server.engine.residency_snapshot()["ram"]]
    assert server.digests["acme/alice/style"] in resident
    with pytest.raises(openai.NotFoundError) as other:
        globex.chat.completions.create(model="acme/alice/style", messages=MSGS, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        globex.chat.completions.create(model="acme/nobody/style", messages=MSGS, max_tokens=2)
    # Same status, same shape, same words: nothing tells "exists elsewhere" from "does not exist".
    assert other.value.body["code"] == missing.value.body["code"] == "model_not_found"
    assert other.value.body["message"].replace("alice", "X") == missing.value.body["message"].replace("nobody", "X")
    with pytest.raises(openai.NotFoundError):
        globex.completions.create(model="acme/alice/style#1", prompt="x", max_tokens=2)


def test_models_lists_own_tenant_only(server):
    ids = {m.id for m in client(server, "acme").models.list()}
    assert {"acme/alice/style", "acme/bob/style", server.base.name} <= ids
    assert not any(i.startswith("globex/") for i in ids)


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"max_tokens": 100_000}, 400),
        ({"n": 9}, 400),  # over MAX_N (n up to 8 is served: tests/api/test_openai_params.py)
        ({"temperature": 5}, 400),
        ({"model": "not a model"}, 404),
        ({"messages": []}, 400),
    ],
)
def test_bad_requests_are_openai_errors(server, kwargs, status):
    args = {"model": "acme/alice/style", "messages": MSGS, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client(server, "acme").chat.completions.create(**args)
    assert err.value.status_code == status
    assert err.value.body["message"]


def test_auth_required(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="lf-nope-0000000000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="acme/alice/style", messages=MSGS, max_tokens=2)


def test_nan_logits_are_an_error_never_an_empty_200(server, monkeypatch):
    """An adapter whose finite-but-huge weights (x 1e30) overflow the forward pass — stored before the load-time
    bound existed, simulated by lifting it — answers 500 ``non_finite_logits`` (streaming: an error event), while
    requests in parallel on other adapters are answered as usual."""
    from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
    from lorafleet.adapters import weights as weights_mod
    from lorafleet.registry import Provenance

    monkeypatch.setattr(weights_mod, "MAX_DELTA_RATIO", float("inf"))
    good = LoraAdapter.create(server.base, LoraSpec(rank=2, target_modules="all"), seed=9, init="random")
    huge = LoraAdapter(spec=good.spec, weights={k: (A * 1e30, B * 1e30) for k, (A, B) in good.weights.items()})
    server.registry.create_adapter("acme/huge/style", exist_ok=True)
    server.registry.commit("acme/huge/style", to_bytes(huge), Provenance(base_fingerprint=server.base.fingerprint),
                           aliases=("live",))
    api = client(server, "acme")
    with ThreadPoolExecutor(4) as pool:
        fine = [pool.submit(api.chat.completions.create, model="acme/alice/style", messages=MSGS, max_tokens=8,
                            temperature=0) for _ in range(3)]
        with pytest.raises(openai.InternalServerError) as err:
            api.chat.completions.create(model="acme/huge/style", messages=MSGS, max_tokens=8, temperature=0)
        assert all(f.result().choices[0].message.content == direct(server, "acme/alice/style", MSGS) for f in fine)
    assert err.value.body["code"] == "non_finite_logits" and "NaN/Inf" in err.value.body["message"]
    stream = api.chat.completions.create(model="acme/huge/style", messages=MSGS, max_tokens=8, stream=True)
    with pytest.raises(openai.APIError, match="non-finite logits"):
        list(stream)
