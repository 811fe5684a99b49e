"""Malformed JSON shapes on the Tinker routes (issue 20, item 2) and asample's per-request limits (item 6).

Every case is a 400 naming the field — never a 409/429/5xx, which the SDK retries — nothing is created, and
the server keeps answering afterwards. Raw HTTP on purpose: the SDK's own types would refuse these shapes
client-side, a hostile client does not use the SDK.
"""

from __future__ import annotations

import copy

import httpx
import pytest


@pytest.fixture(scope="module")
def ctx(server, tk):
    """A session, a run and a sampling session of tenant acme, made with valid bodies."""
    h = {"X-API-Key": "tml-" + server.keys["acme"]}
    with httpx.Client(base_url=f"{server.url}/api/v1", headers=h, timeout=60) as c:
        sid = c.post("/create_session", json={"tags": [], "user_metadata": None, "sdk_version": "0.38.0"}).json()[
            "session_id"]
        r = c.post("/create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": server.base.name,
                                           "lora_config": {"rank": 4}})
        assert r.status_code == 200, r.text
        mid = r.json()["model_id"]
        r = c.post("/create_sampling_session", json={"session_id": sid, "sampling_session_seq_id": 0,
                                                     "base_model": server.base.name})
        assert r.status_code == 200, r.text
        yield {"client": c, "session_id": sid, "model_id": mid, "sampler": r.json()["sampling_session_id"]}


def good(route: str, ctx, server) -> dict:
    return {
        "asample": {"sampling_session_id": ctx["sampler"], "num_samples": 1,
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                    "sampling_params": {"max_tokens": 2, "temperature": 0.0}},
        "create_model": {"session_id": ctx["session_id"], "model_seq_id": 99, "base_model": server.base.name,
                         "lora_config": {"rank": 4}},
        "optim_step": {"model_id": ctx["model_id"], "adam_params": {"learning_rate": 1e-3}},
        "session_heartbeat": {"session_id": ctx["session_id"]},
        "get_info": {"model_id": ctx["model_id"]},
        "save_weights": {"model_id": ctx["model_id"], "path": "ck"},
        "load_weights": {"model_id": ctx["model_id"], "path": "tinker://x/weights/ck", "optimizer": False},
        "create_sampling_session": {"session_id": ctx["session_id"], "sampling_session_seq_id": 1,
                                    "base_model": server.base.name},
        "retrieve_future": {"request_id": "nope"},
        "create_session": {"tags": [], "user_metadata": {"a": "b"}, "sdk_version": "0.38.0"},
        "sessions/search": {"user_metadata": {"a": "b"}, "limit": 5},
        "weights_info": {"tinker_path": "tinker://x/weights/ck"},
        "save_weights_for_sampler": {"model_id": ctx["model_id"], "path": "s1", "user_metadata": {"k": "v"}},
    }[route]


BIG = 10**30  # beyond 64 bits
CASES = [  # (route, path to the field, bad value, what the message names)
    ("asample", ("sampling_params", "stop"), 5, "sampling_params.stop"),
    ("asample", ("sampling_params", "stop"), ["a", 1], "sampling_params.stop"),
    ("asample", ("prompt",), [1, 2], "prompt"),
    ("asample", ("prompt", "chunks", 0, "tokens"), ["a"], "prompt.chunks.0.tokens.0"),
    ("asample", ("prompt", "chunks", 0, "tokens"), [BIG], "prompt.chunks.0.tokens.0"),
    ("asample", ("sampling_params", "temperature"), [1], "sampling_params.temperature"),
    ("asample", ("sampling_params", "top_k"), "5", "sampling_params.top_k"),
    ("asample", ("sampling_params",), [1], "sampling_params"),
    ("asample", ("sampling_params", "seed"), "7", "sampling_params.seed"),
    ("asample", ("num_samples",), "2", "num_samples"),
    ("asample", ("sampling_params", "max_tokens"), BIG, "sampling_params.max_tokens"),
    ("create_model", ("optimizer_config",), "sgd", "optimizer_config"),
    ("create_model", ("user_metadata",), ["x"], "user_metadata"),
    ("create_model", ("lora_config", "seed"), "abc", "lora_config.seed"),
    ("create_model", ("lora_config", "seed"), BIG, "lora_config.seed"),
    ("create_model", ("lora_config",), [4], "lora_config"),
    ("create_model", ("lora_config", "rank"), "4", "lora_config.rank"),
    ("create_model", ("model_seq_id",), "1", "model_seq_id"),
    ("create_model", ("session_id",), {"a": 1}, "session_id"),
    ("optim_step", ("adam_params", "learning_rate"), "x", "adam_params.learning_rate"),
    ("optim_step", ("adam_params", "learning_rate"), None, "adam_params.learning_rate"),
    ("optim_step", ("adam_params",), 5, "adam_params"),
    ("optim_step", ("seq_id",), "3", "seq_id"),
    ("session_heartbeat", ("session_id",), 5, "session_id"),
    ("get_info", ("model_id",), ["x"], "model_id"),
    ("save_weights", ("path",), 5, "path"),
    ("load_weights", ("optimizer",), "yes", "optimizer"),
    ("create_sampling_session", ("model_path",), 5, "model_path"),
    ("retrieve_future", ("request_id",), {}, "request_id"),
    ("create_session", ("user_metadata",), ["x"], "user_metadata"),
    ("create_session", ("display_name",), 5, "display_name"),
    ("sessions/search", ("user_metadata",), {"a": 1}, "user_metadata.a"),
    ("sessions/search", ("limit",), 0, "limit"),
    ("sessions/search", ("limit",), 201, "limit"),
    ("sessions/search", ("owner",), {"type": "everyone"}, "owner.type"),
    ("sessions/search", ("statuses",), [], "statuses"),
    ("sessions/search", ("cursor",), {"last_created_at": 5}, "cursor.last_created_at"),
    ("weights_info", ("tinker_path",), None, "tinker_path"),
    ("save_weights_for_sampler", ("user_metadata",), {"k": 5}, "user_metadata.k"),
    ("save_weights_for_sampler", ("user_metadata",), "k=v", "user_metadata"),
]


def _set(body: dict, path: tuple, value) -> dict:
    body = copy.deepcopy(body)
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


@pytest.mark.parametrize(("route", "path", "value", "named"), CASES,
                         ids=[f"{r}-{'.'.join(map(str, p))}={v!r}"[:60] for r, p, v, _ in CASES])
def test_malformed_shape_is_400_naming_the_field(server, tk, ctx, route, path, value, named):
    runs_before = len(tk.runs)
    r = ctx["client"].post(f"/{route}", json=_set(good(route, ctx, server), path, value))
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and f"/api/v1/{route}: {named}:" in err["message"], err
    assert len(tk.runs) == runs_before  # nothing was created
    assert ctx["client"].post("/session_heartbeat", json={"session_id": ctx["session_id"]}).status_code == 200


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                                  b"[1]", b"not json", b""], ids=["deep-list", "deep-object", "list", "text", "empty"])
@pytest.mark.parametrize("route", ["session_heartbeat", "create_model", "asample"])
def test_body_that_is_not_a_shallow_json_object_is_400(server, ctx, route, body):
    r = ctx["client"].post(f"/{route}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert r.json()["error"]["message"].startswith(f"/api/v1/{route}: ")
    assert ctx["client"].get("/healthz").status_code == 200


def test_deep_json_on_the_openai_routes_is_400(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000, timeout=30,
                   headers={"Authorization": f"Bearer {server.keys['acme']}", "content-type": "application/json"})
    assert r.status_code == 400, r.text[:300]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_samples", 17, "num_samples must be an integer in 1..16"),
    ("max_tokens", 10**9, "sampling_params.max_tokens must be an integer in 1..1024"),
    ("max_tokens", 1025, "sampling_params.max_tokens must be an integer in 1..1024"),
])
def test_asample_takes_the_servers_per_request_limits(server, ctx, field, value, message):
    body = good("asample", ctx, server)
    if field == "num_samples":
        body["num_samples"] = value
    else:
        body["sampling_params"][field] = value
    r = ctx["client"].post("/asample", json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    ok = ctx["client"].post("/asample", json=good("asample", ctx, server))
    assert ok.status_code == 200 and ok.json()["request_id"], ok.text


def test_asample_prompt_token_limit(server, ctx, monkeypatch):
    from dataclasses import replace

    monkeypatch.setattr(server.service, "limits", replace(server.service.limits, max_prompt_tokens=8))
    body = good("asample", ctx, server)
    body["prompt"]["chunks"][0]["tokens"] = list(range(1, 10))
    r = ctx["client"].post("/asample", json=body)
    assert r.status_code == 400 and "prompt: 9 tokens; this server's limit is 8" in r.json()["error"]["message"]


def test_a_million_token_prompt_is_refused_while_health_answers(server, ctx):
    """3 MB of token ids (within the body limit): parsed and validated off the event loop, refused by length."""
    from lorafleet.testing.hostile import health_pings

    body = good("asample", ctx, server)
    body["prompt"]["chunks"][0]["tokens"] = [1] * 1_000_000
    with health_pings(server.url, interval=0.01, min_pings=1) as latencies:
        r = ctx["client"].post("/asample", json=body)
    assert r.status_code == 400 and "prompt: 1000000 tokens exceed the base's context" in r.json()["error"]["message"]
    assert latencies and max(latencies) < 1.0, max(latencies)


def test_session_search_semantic_errors(server, ctx):
    bad = ctx["client"].post("/sessions/search", json={"owner": {"type": "user", "owner_urns": ["u:1"]}})
    assert bad.status_code == 400 and "owner type 'user' is not supported" in bad.json()["error"]["message"]
    bad = ctx["client"].post("/sessions/search", json={"cursor": {"last_created_at": "yesterday",
                                                                 "last_session_id": "s"}})
    assert bad.status_code == 400 and "is not an ISO 8601 time" in bad.json()["error"]["message"]
    bad = ctx["client"].post("/create_session", json={"project_id": "globex"})
    assert bad.status_code == 400 and "this key's only project is its tenant, 'acme'" in bad.json()["error"]["message"]
    assert ctx["client"].post("/create_session", content=b"").status_code == 200  # curl with no body
