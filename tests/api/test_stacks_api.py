"""Stacks over HTTP: parents set through the management API (validated), a stacked model is served with every
level and the response names each revision used; promoting the org adapter changes every member's answer."""

import httpx
import openai

from lorafleet.serving.params import SamplingParams

MSGS = [{"role": "user", "content": "Say something nice."}]


def test_stacked_model_serves_every_level_and_names_them(server, admin_client, make_live):
    reg, base, commit_live = server.registry, server.base, make_live
    r = admin_client.post("/v1/adapters", json={"ref": "acme/_org/support"})
    assert r.status_code == 201, r.text
    org1 = commit_live(reg, base, "acme/_org/support", 21)
    r = admin_client.post("/v1/adapters", json={"ref": "acme/carol/assistant", "parent": "acme/_org/support"})
    assert r.status_code == 201 and r.json()["parent"] == "acme/_org/support", r.text
    carol = commit_live(reg, base, "acme/carol/assistant", 22)

    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["acme"], max_retries=0, timeout=60)
    raw = c.chat.completions.with_raw_response.create(model="acme/carol/assistant", messages=MSGS, max_tokens=8,
                                                      temperature=0)
    meta = raw.http_response.json()["lorafleet"]
    assert [lvl["digest"] for lvl in meta["stack"]] == [org1, carol]
    assert [lvl["address"] for lvl in meta["stack"]] == ["acme/_org/support#1", "acme/carol/assistant#1"]
    assert meta["revision"] == "acme/carol/assistant#1" and meta["digest"] == carol
    text = raw.parse().choices[0].message.content
    direct = server.engine.generate([MSGS], [(org1, carol)], SamplingParams(max_tokens=8))[0].text
    alone = server.engine.generate([MSGS], [carol], SamplingParams(max_tokens=8))[0].text
    assert text == direct and text != alone

    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={
            "model": "acme/carol/assistant", "messages": MSGS, "max_tokens": 3, "temperature": 0, "stream": True},
            headers={"authorization": f"Bearer {server.keys['acme']}"}, timeout=60) as resp:
        assert resp.headers["x-lorafleet-stack"] == "acme/_org/support#1,acme/carol/assistant#1"

    # promoting the org adapter moves the member at once
    org2 = commit_live(reg, base, "acme/_org/support", 23)
    meta2 = c.chat.completions.with_raw_response.create(
        model="acme/carol/assistant", messages=MSGS, max_tokens=8, temperature=0).http_response.json()["lorafleet"]
    assert [lvl["digest"] for lvl in meta2["stack"]] == [org2, carol]

    stack = admin_client.get("/v1/adapters/acme/carol/assistant/stack").json()["data"]
    assert [s["digest"] for s in stack] == [org2, carol]


def test_parent_validation_over_http(server, admin_client):
    admin_client.post("/v1/adapters", json={"ref": "acme/_org/legal"})
    admin_client.post("/v1/adapters", json={"ref": "acme/dan/assistant"})
    r = admin_client.put("/v1/adapters/acme/dan/assistant/parent", json={"parent": "globex/gina/style"})
    assert r.status_code == 400 and "tenant" in r.json()["error"]["message"]
    r = admin_client.put("/v1/adapters/acme/_org/legal/parent", json={"parent": "acme/_org/legal"})
    assert r.status_code == 400 and "its own parent" in r.json()["error"]["message"]
    r = admin_client.put("/v1/adapters/acme/dan/assistant/parent", json={"parent": "acme/_org/legal", "reason": "x"})
    assert r.status_code == 200 and r.json()["action"] == "parent.set"
    assert admin_client.get("/v1/adapters/acme/dan/assistant").json()["parent"] == "acme/_org/legal"
    r = admin_client.put("/v1/adapters/acme/dan/assistant/parent", json={"parent": None})
    assert r.status_code == 200 and admin_client.get("/v1/adapters/acme/dan/assistant").json()["parent"] is None
