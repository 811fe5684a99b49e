"""The continual-learning loop end to end on the tiny base, through the HTTP app:
serve -> capture -> feedback -> scheduled job (worker) -> candidate -> gate -> live; then forgetting the user."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.api.app import create_app
from lorafleet.api.service import Service
from lorafleet.base import load_base
from lorafleet.continual.schedule import Scheduler
from lorafleet.registry import NotFoundError, Provenance, Registry
from lorafleet.serving.engine import Engine
from lorafleet.serving.params import EngineConfig
from lorafleet.serving.sources import registry_fetch
from lorafleet.training.worker import Worker

REF = "acme/alice/assistant"
STYLE = "Ahoy matey, the sea is calm today and the answer is near."
PROMPTS = [f"Question number {i}: what should I do about item {i}?" for i in range(12)]
POLICY = {"min_examples": 8, "steps": 12, "lr": 0.02, "rank": 4, "batch_size": 4, "max_len": 256,
          "max_new_tokens": 8, "holdout": 0.25, "replay": 1.0}


@pytest.fixture()
def app_env(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "blobs"))
    base = load_base("tiny")
    engine = Engine(base, registry_fetch(reg), EngineConfig(max_batch=8, max_active=4, max_cached=8, max_rank=16))
    service = Service(reg, base, engine)
    _, admin = service.keys.create(admin=True)
    _, tenant = service.keys.create(tenant="acme")
    _, other = service.keys.create(tenant="globex")
    adapter = LoraAdapter.create(base, LoraSpec(rank=4, alpha=8, target_modules="all"), seed=0)
    reg.create_adapter(REF)
    reg.commit(REF, to_bytes(adapter), Provenance(base_fingerprint=base.fingerprint, method="init"),
               aliases=("candidate", "live"))
    with TestClient(create_app(service)) as client:
        yield client, service, {"admin": admin, "acme": tenant, "globex": other}
    reg.close()


def _h(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def _chat(client, key: str, prompt: str, **kw) -> dict:
    r = client.post("/v1/chat/completions", headers=_h(key), json={
        "model": REF, "messages": [{"role": "user", "content": prompt}], "max_tokens": 6, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_loop_end_to_end(app_env):
    client, service, keys = app_env
    reg = service.registry
    # capture is off by default: nothing is recorded
    before = _chat(client, keys["acme"], "hello")
    r = client.post("/v1/feedback", headers=_h(keys["acme"]), json={"response_id": before["id"], "rating": 1})
    assert r.status_code == 404 and "not captured" in r.json()["error"]["message"]

    r = client.put(f"/v1/adapters/{REF}/memory", headers=_h(keys["admin"]),
                   json={"capture": True, "enabled": True, "policy": POLICY})
    assert r.status_code == 200 and r.json()["capture"] and r.json()["policy"]["min_examples"] == 8
    served = [_chat(client, keys["acme"], p) for p in PROMPTS]
    assert all(s["lorafleet"]["revision"] == f"{REF}#1" for s in served)

    # another tenant cannot see (or rate) acme's responses; a bad rating names the problem
    r = client.post("/v1/feedback", headers=_h(keys["globex"]), json={"response_id": served[0]["id"], "rating": 1})
    assert r.status_code == 404
    r = client.post("/v1/feedback", headers=_h(keys["acme"]), json={"response_id": served[0]["id"], "rating": 5})
    assert r.status_code == 400 and "rating" in r.text

    for s in served[:10]:  # the user rewrites answers into their style: SFT examples
        r = client.post("/v1/feedback", headers=_h(keys["acme"]), json={"response_id": s["id"], "rewrite": STYLE})
        assert r.status_code == 201 and r.json()["method"] == "sft", r.text
    # a choice between two answers to the same prompt: a DPO pair
    a = _chat(client, keys["acme"], PROMPTS[0], temperature=1.0, seed=1, max_tokens=5)
    b = _chat(client, keys["acme"], PROMPTS[0], temperature=1.0, seed=2, max_tokens=5)
    assert a["choices"][0]["message"]["content"] != b["choices"][0]["message"]["content"]
    r = client.post("/v1/feedback", headers=_h(keys["acme"]),
                    json={"response_id": a["id"], "other_id": b["id"], "preferred": "other"})
    assert r.status_code == 201 and r.json()["record"]["chosen"] == b["choices"][0]["message"]["content"]

    # the worker runs the scheduler: due (>= 8 new examples) -> job -> candidate #2 -> evaluation -> gate
    scheduler = Scheduler(reg, service.base, memory=service.memory)
    Worker(reg, service.base, hooks=[scheduler.tick]).run(until_idle=True)
    settings = service.memory.settings(REF)
    assert settings.pending_job is None and settings.watermark > 0
    last = settings.last_result
    assert last["state"] == "promoted", last
    live = reg.resolve(REF)
    assert live.number == 2 and live.provenance.parent == 1
    window = live.provenance.hyperparams["window"]
    assert window["new_examples"] >= 7 and window["heldout_examples"] >= 1 and window["method"] == "sft"
    assert window["feedback_ids"][1] == settings.watermark
    metrics = live.provenance.metrics
    assert metrics["gate"]["decision"] == "promoted" and metrics["eval_loss"] < metrics["base_eval_loss"]
    assert reg.audit(REF, 1)[0].actor == "scheduler"
    after = _chat(client, keys["acme"], PROMPTS[-1])
    assert after["lorafleet"]["revision"] == f"{REF}#2"
    print(repr(served[-1]["choices"][0]["message"]["content"]), repr(after["choices"][0]["message"]["content"]))
    assert after["choices"][0]["message"]["content"] != served[-1]["choices"][0]["message"]["content"]

    # nothing new: the next tick does nothing
    assert scheduler.tick() == []


def test_forget_through_the_admin_api(app_env):
    client, service, keys = app_env
    reg = service.registry
    client.put(f"/v1/adapters/{REF}/memory", headers=_h(keys["admin"]), json={"capture": True})
    secret = "my private question about the lighthouse"
    s = _chat(client, keys["acme"], secret)
    client.post("/v1/feedback", headers=_h(keys["acme"]), json={"response_id": s["id"], "rewrite": "lighthouse!"})
    digest = reg.resolve(REF).digest
    assert any(r["digest"] == digest for r in service.engine.residency_snapshot()["ram"])
    r = client.delete("/v1/users/acme/alice", headers=_h(keys["acme"]))
    assert r.status_code == 403
    r = client.delete("/v1/users/acme/alice", headers=_h(keys["admin"]))
    assert r.status_code == 200, r.text
    assert r.json()["interactions"] == 1 and r.json()["feedback"] == 1 and r.json()["purged_from_engine"] == 1
    with pytest.raises(NotFoundError):
        reg.resolve(REF)
    assert not reg.blobs.exists(digest)
    snap = service.engine.residency_snapshot()
    assert all(x["digest"] != digest for x in snap["ram"]) and all(x["digest"] != digest for x in snap["slots"])
    r = client.post("/v1/chat/completions", headers=_h(keys["acme"]),
                    json={"model": REF, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    assert client.get("/v1/users/acme/alice/memory?export=true", headers=_h(keys["admin"])).json()["interactions"] == []
