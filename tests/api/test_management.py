"""The management API: admin-only, uploads validated before anything is committed, aliases, jobs, metrics."""

import io
import json
import zipfile

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lorafleet.adapters import LoraAdapter, LoraSpec, peft_io, to_bytes
from lorafleet.base import load_base


def _peft_files(base, **overrides):
    adapter = LoraAdapter.create(base, LoraSpec(rank=4, alpha=8, target_modules="attention"), seed=9, init="random")
    config = json.dumps(peft_io.peft_config(adapter)).encode()
    weights = peft_io.peft_weights_bytes(adapter)
    files = {"adapter_config.json": config, "adapter_model.safetensors": weights}
    files.update(overrides)
    return files


def _upload(client, ref, files, **params):
    multipart = [("files", (name, data, "application/octet-stream")) for name, data in files.items()]
    return client.post(f"/v1/adapters/{ref}/revisions", files=multipart, params=params)


def test_admin_routes_refuse_tenant_keys_and_anonymous(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/v1/adapters").status_code == 401
        r = c.get("/v1/adapters", headers={"authorization": f"Bearer {server.keys['acme']}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
        r = c.post("/v1/adapters", json={"ref": "acme/x/y"}, headers={"authorization": f"Bearer {server.keys['acme']}"})
        assert r.status_code == 403
        assert c.get("/health").json()["status"] == "ok"


def test_adapter_lifecycle_over_http(server, admin_client):
    c = admin_client
    assert c.post("/v1/adapters", json={"ref": "initech/pat/notes"}).status_code == 201
    assert c.post("/v1/adapters", json={"ref": "initech/pat/notes"}).status_code == 409
    r = _upload(c, "initech/pat/notes", _peft_files(server.base))
    assert r.status_code == 201, r.text
    assert r.json()["number"] == 1 and "candidate" in r.json()["aliases"]
    raw = to_bytes(LoraAdapter.create(server.base, LoraSpec(rank=2, target_modules="mlp"), seed=1, init="random"))
    r = c.post("/v1/adapters/initech/pat/notes/revisions", content=raw, params={"alias": "canary"},
               headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    assert r.json()["number"] == 2
    assert c.put("/v1/adapters/initech/pat/notes/aliases/live", json={"number": 1, "reason": "ok"}).status_code == 200
    assert c.put("/v1/adapters/initech/pat/notes/aliases/live", json={"number": 2, "reason": "ok"}).status_code == 200
    r = c.post("/v1/adapters/initech/pat/notes/rollback", json={"reason": "regression"})
    assert r.status_code == 200 and r.json()["to_number"] == 1
    assert c.get("/v1/adapters/initech/pat/notes").json()["aliases"]["live"] == 1
    hist = c.get("/v1/adapters/initech/pat/notes/revisions").json()["data"]
    assert [h["number"] for h in hist] == [1, 2]
    audit = c.get("/v1/adapters/initech/pat/notes/audit").json()["data"]
    assert any(e["action"] == "rollback" and e["reason"] == "regression" for e in audit)
    blob = c.get("/v1/adapters/initech/pat/notes/revisions/2/download")
    assert blob.status_code == 200 and blob.content == raw
    z = c.get("/v1/adapters/initech/pat/notes/revisions/1/download", params={"format": "peft"})
    names = zipfile.ZipFile(io.BytesIO(z.content)).namelist()
    assert sorted(names) == ["adapter_config.json", "adapter_model.safetensors"]
    page = c.get("/v1/adapters", params={"tenant": "initech", "limit": 1}).json()
    assert len(page["data"]) == 1


def _bad(kind, base):
    files = _peft_files(base)
    if kind == "pickle":
        return {"adapter_config.json": files["adapter_config.json"], "adapter_model.bin": b"\x80\x04\x95 pickle"}
    if kind == "truncated":
        return {**files, "adapter_model.safetensors": files["adapter_model.safetensors"][:-64]}
    tensors = st_load(files["adapter_model.safetensors"])
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    if kind == "wrong_shapes":
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 2)
    elif kind == "nan":
        tensors[key][0, 0] = float("nan")
    elif kind == "huge":  # finite, but every tensor x 1e30: it would serve NaN logits
        tensors = {k: v * 1e30 for k, v in tensors.items()}
    return {**files, "adapter_model.safetensors": st_save(tensors)}


@pytest.mark.parametrize(
    ("kind", "status", "match"),
    [
        ("pickle", 422, "pickle"),
        ("truncated", 422, "truncated or malformed"),
        ("wrong_shapes", 422, "do not fit base"),
        ("nan", 422, "NaN or Inf"),
        ("huge", 422, "over the bound of 1000x"),
        ("wrong_base", 422, "made for base"),
        ("path_trick", 422, "no adapter_model.safetensors"),
        ("empty_raw", 400, "empty upload"),
        ("too_large", 413, "over the limit"),
    ],
)
def test_bad_uploads_commit_nothing(server, admin_client, kind, status, match):
    ref = "initech/bad/notes"
    admin_client.post("/v1/adapters", json={"ref": ref})
    before = admin_client.get(f"/v1/adapters/{ref}/revisions").json()["data"]
    if kind == "wrong_base":
        r = _upload(admin_client, ref, _peft_files(server.base), base_fingerprint="0" * 64)
    elif kind == "path_trick":
        r = _upload(admin_client, ref, {"../../etc/adapter_model.safetensors.x": b"x"})
    elif kind == "empty_raw":
        r = admin_client.post(f"/v1/adapters/{ref}/revisions", content=b"",
                              headers={"content-type": "application/octet-stream"})
    elif kind == "too_large":
        r = admin_client.post(f"/v1/adapters/{ref}/revisions", content=b"\0" * (3 * 1024 * 1024),
                              headers={"content-type": "application/octet-stream"})
    else:
        r = _upload(admin_client, ref, _bad(kind, server.base))
    assert r.status_code == status, r.text
    assert match in r.json()["error"]["message"]
    assert admin_client.get(f"/v1/adapters/{ref}/revisions").json()["data"] == before


def test_upload_of_a_save_pretrained_folder_ignores_readme(server, admin_client, tmp_path):
    """The exact folder ``peft.save_pretrained`` writes (README.md included) uploads; the extras are listed."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = get_peft_model(copy.deepcopy(load_base("tiny").model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "p")
    files = {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir()}
    assert "README.md" in files
    ref = "initech/pat/peft"
    admin_client.post("/v1/adapters", json={"ref": ref})
    r = _upload(admin_client, ref, files)
    assert r.status_code == 201, r.text
    assert r.json()["ignored_files"] == sorted(set(files) - {"adapter_config.json", "adapter_model.safetensors"})
    assert "README.md" in r.json()["ignored_files"]


def test_jobs_over_http(server, admin_client):
    c = admin_client
    c.post("/v1/adapters", json={"ref": "initech/jo/notes"})
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    r = c.post("/v1/jobs", json={"ref": "initech/jo/notes", "records": records, "steps": 2, "rank": 2})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued"
    assert c.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    assert any(j["id"] == job["id"] for j in c.get("/v1/jobs").json()["data"])
    assert c.delete(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
    r = c.post("/v1/jobs", json={"ref": "initech/jo/notes", "records": [{"text": "no"}]})
    assert r.status_code == 422 and "exactly one key 'messages'" in r.json()["error"]["message"]
    r = c.post("/v1/jobs", json={"ref": "initech/nobody/notes", "records": records})
    assert r.status_code == 404


def test_residency_and_metrics(server, admin_client):
    import openai

    openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["acme"], max_retries=0).chat.completions.create(
        model="acme/bob/style", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    res = admin_client.get("/v1/fleet/residency").json()
    assert any(e["digest"] == server.digests["acme/bob/style"] for e in res["ram"])
    assert res["metrics"]["counters"]["tokens_generated"] > 0
    text = admin_client.get("/metrics").text
    for name in ("lorafleet_http_requests_total", "lorafleet_tokens_generated_total", "lorafleet_adapter_lookups_total",
                 "lorafleet_load_latency_seconds_bucket", "lorafleet_engine_", "lorafleet_training_jobs"):
        assert name in text, name



def test_upload_idempotency_key_survives_a_restart(tmp_path):
    """``Idempotency-Key``: the same key and content return the first revision (200, ``idempotent-replayed``), also
    from a new server process over the same database; other content (or another adapter) under the key is a 409
    naming both; a malformed key is a 400; none of the refused requests commits anything."""
    import httpx

    from lorafleet.api.service import Service
    from lorafleet.base import load_base
    from lorafleet.registry import Registry
    from lorafleet.testing.harness import LoopbackServer

    base = load_base("tiny")
    db, blobs = f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "blobs")
    one = to_bytes(LoraAdapter.create(base, LoraSpec(rank=2, target_modules="mlp"), seed=1, init="random"))
    two = to_bytes(LoraAdapter.create(base, LoraSpec(rank=2, target_modules="mlp"), seed=2, init="random"))
    octet = {"content-type": "application/octet-stream"}

    def post(c, ref, data, key):
        return c.post(f"/v1/adapters/{ref}/revisions", content=data, headers={**octet, "idempotency-key": key})

    admin = None
    for attempt in range(2):  # the second pass is a new server (and registry) over the same database
        reg = Registry(db, blobs)
        service = Service(reg, base)
        if admin is None:
            _, admin = service.keys.create(admin=True)
            reg.create_adapter("acme/kim/notes")
            reg.create_adapter("acme/kim/other")
        with LoopbackServer(service) as srv, httpx.Client(
                base_url=srv.url, headers={"authorization": f"Bearer {admin}"}, timeout=60) as c:
            r = post(c, "acme/kim/notes", one, "upload-7f3a")
            assert r.status_code == (201 if attempt == 0 else 200), r.text
            assert r.json()["number"] == 1
            assert (r.headers.get("idempotent-replayed") == "true") == (attempt == 1)
            again = post(c, "acme/kim/notes", one, "upload-7f3a")
            assert again.status_code == 200, again.text
            assert again.json() == r.json()  # the original revision, as the first answer described it
            assert again.headers["idempotent-replayed"] == "true"
            for ref, data in (("acme/kim/notes", two), ("acme/kim/other", one)):
                bad = post(c, ref, data, "upload-7f3a")
                assert bad.status_code == 409, bad.text
                err = bad.json()["error"]
                assert err["code"] == "idempotency_key_reused" and "acme/kim/notes#1" in err["message"]
            bad = post(c, "acme/kim/notes", two, "k" * 300)
            assert bad.status_code == 400 and "Idempotency-Key" in bad.text
            # without a key, the same content is a new revision (uploads stay non-idempotent unless asked)
            assert c.post("/v1/adapters/acme/kim/notes/revisions", content=one, headers=octet).json()["number"] == 2 + attempt
        assert [x.number for x in reg.history("acme/kim/other")] == []
        reg.close()
