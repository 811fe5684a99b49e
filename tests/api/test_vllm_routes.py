"""vLLM's dynamic LoRA routes over real HTTP: load a PEFT folder by path, chat with it by its bare name
(official `openai` client), unload it; bad requests change nothing."""

from __future__ import annotations

import copy
import json

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from lorafleet.base import load_base
from lorafleet.serving.params import SamplingParams

MSGS = [{"role": "user", "content": "Say something nice."}]


@pytest.fixture(scope="module")
def peft_folder(server, tmp_path_factory):
    """A folder exactly as ``peft.save_pretrained`` writes it, made strong enough to change the tiny model."""
    path = tmp_path_factory.mktemp("vllm") / "sql-lora"
    torch.manual_seed(4)
    model = get_peft_model(copy.deepcopy(load_base("tiny").model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(path)
    weights = load_file(path / "adapter_model.safetensors")
    save_file({k: v * 50 if "lora_B" in k else v for k, v in weights.items()}, path / "adapter_model.safetensors")
    return path


def _post(server, route, body, who="admin"):
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {server.keys[who]}"}, timeout=60) as c:
        return c.post(route, json=body)


def test_load_chat_unload(server, peft_folder):
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "sql-lora", "lora_path": str(peft_folder)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ref"] == "local/lora/sql-lora" and body["status"] == "committed" and "README.md" in body["ignored_files"]
    rev = server.registry.resolve("local/lora/sql-lora")
    assert rev.provenance.method == "import" and rev.provenance.hyperparams["source"] == str(peft_folder)

    admin = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["admin"], max_retries=0, timeout=60)
    assert "sql-lora" in [m.id for m in admin.models.list()]
    out = admin.chat.completions.create(model="sql-lora", messages=MSGS, max_tokens=8, temperature=0)
    direct = server.engine.generate([MSGS], [rev.digest], SamplingParams(max_tokens=8))[0].text
    base = server.engine.generate([MSGS], [None], SamplingParams(max_tokens=8))[0].text
    assert out.choices[0].message.content == direct != base
    assert out.model_extra["lorafleet"]["revision"] == "local/lora/sql-lora#1"

    again = _post(server, "/v1/load_lora_adapter", {"lora_name": "sql-lora", "lora_path": str(peft_folder)})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    inplace = _post(server, "/v1/load_lora_adapter",
                    {"lora_name": "sql-lora", "lora_path": str(peft_folder), "load_inplace": True})
    assert inplace.status_code == 200 and inplace.json()["status"] == "unchanged" and inplace.json()["number"] == 1

    r = _post(server, "/v1/unload_lora_adapter", {"lora_name": "sql-lora"})
    assert r.status_code == 200 and r.json()["unloaded_revision"] == 1
    with pytest.raises(openai.NotFoundError):
        admin.chat.completions.create(model="sql-lora", messages=MSGS, max_tokens=4)
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "sql-lora"}).status_code == 404
    assert server.registry.history("local/lora/sql-lora")[0].number == 1  # the revision stays


def test_full_ref_names_too(server, peft_folder):
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "acme/carl/sql", "lora_path": f"file://{peft_folder}"})
    assert r.status_code == 200, r.text
    tenant = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["acme"], max_retries=0, timeout=60)
    assert tenant.chat.completions.create(model="acme/carl/sql", messages=MSGS, max_tokens=3).choices


@pytest.mark.parametrize(("body", "who", "status", "match"), [
    ({"lora_name": "x1", "lora_path": "/nonexistent/folder"}, "admin", 422, "does not exist"),
    ({"lora_name": "Bad Name", "lora_path": "/tmp"}, "admin", 400, "invalid adapter segment"),
    ({"lora_name": "x2"}, "admin", 400, "lora_path"),
    ({"lora_name": "x3", "lora_path": "/tmp", "extra": 1}, "admin", 400, "extra"),
    ({"lora_name": "x4", "lora_path": "PEFT"}, "acme", 403, "admin key"),
])
def test_bad_loads_change_nothing(server, peft_folder, body, who, status, match):
    if body.get("lora_path") == "PEFT":
        body = {**body, "lora_path": str(peft_folder)}
    before = server.registry.list_adapters(limit=1000)[0]
    r = _post(server, "/v1/load_lora_adapter", body, who)
    assert r.status_code == status, r.text
    assert match in r.text
    assert server.registry.list_adapters(limit=1000)[0] == before


def test_bad_adapter_folder_is_refused(server, peft_folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in peft_folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(bad / "adapter_model.safetensors")
    key = sorted(weights)[0]
    weights[key][0, 0] = float("nan")
    save_file(weights, bad / "adapter_model.safetensors")
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "nan-lora", "lora_path": str(bad)})
    assert r.status_code == 422 and "NaN or Inf" in r.json()["error"]["message"]
    with pytest.raises(Exception, match="does not exist"):
        server.registry.get_adapter("local/lora/nan-lora")


def test_serve_lora_modules_imports_at_start(peft_folder, tmp_path):
    """``lorafleet serve --lora-modules name=path`` as a real process: the adapter answers by its bare name, and a
    restart with the same folder adds no revision."""
    import os
    import subprocess
    import sys
    import time

    from lorafleet.registry import Registry
    from lorafleet.testing.pgtest import free_port

    env = {**os.environ, "LORAFLEET_HOME": str(tmp_path / "home"), "LORAFLEET_ADMIN_KEY": "lf-admin-test-secret-0123",
           "LORAFLEET_BASE": "tiny", "OMP_NUM_THREADS": "1"}
    env.pop("LORAFLEET_DB_URL", None)
    env.pop("LORAFLEET_BLOB_URL", None)

    def serve():
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "serve", "--port", str(port), "--no-worker",
                                 "--lora-modules", f"sql-lora={peft_folder}",
                                 "--lora-modules", json.dumps({"name": "other", "path": str(peft_folder)})],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read())
            time.sleep(0.2)
        proc.kill()
        raise AssertionError("server did not start")

    for _ in range(2):  # start, stop, start again
        proc, url = serve()
        try:
            c = openai.OpenAI(base_url=f"{url}/v1", api_key=env["LORAFLEET_ADMIN_KEY"], max_retries=0, timeout=60)
            out = c.chat.completions.create(model="sql-lora", messages=MSGS, max_tokens=4, temperature=0)
            assert out.model_extra["lorafleet"]["revision"] == "local/lora/sql-lora#1"
            assert {"sql-lora", "other"} <= {m.id for m in c.models.list()}
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    with Registry(f"sqlite:///{tmp_path / 'home' / 'registry.db'}", str(tmp_path / "home" / "blobs")) as reg:
        assert [r.number for r in reg.history("local/lora/sql-lora")] == [1]


def test_serve_lora_modules_bad_value_is_one_error_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "LORAFLEET_HOME": str(tmp_path / "home"), "LORAFLEET_BASE": "tiny"}
    for value, msg in [("no-equals-sign", "expected name=path"), (f"x={tmp_path / 'missing'}", "does not exist")]:
        proc = subprocess.run([sys.executable, "-m", "lorafleet.cli", "serve", "--no-worker", "--lora-modules", value],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.count("error:") == 1
