"""Hostile HTTP input against a real server on loopback (issue 20): bodies over the limit — chunked included —
are refused while they stream, prompts are measured in characters before any tokenizer runs and in tokens
before the engine sees them, and /health keeps answering meanwhile."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from lorafleet.testing.hostile import chat_body, health_pings, rss_bytes, send_chunked

MB = 1024 * 1024


def _auth(server, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.keys[who]}"}


@pytest.mark.parametrize(("path", "who", "limit"), [
    ("/v1/chat/completions", "acme", "max_body_bytes"),
    ("/v1/feedback", "acme", "max_body_bytes"),
    ("/api/v1/asample", "acme", "max_body_bytes"),
    ("/api/v1/session_heartbeat", "acme", "max_body_bytes"),
    ("/v1/jobs", "admin", "max_body_bytes"),
    ("/v1/adapters/acme/alice/style/revisions", "admin", "max_upload_bytes"),
])
def test_chunked_body_over_the_limit_is_refused_while_streaming(server, path, who, limit):
    result = send_chunked(server.port, path, chat_body(48 * MB), headers=_auth(server, who))
    assert result.status == 413, (result.status, result.body[:200])
    assert b'"too_large"' in result.body and str(getattr(server.service.limits, limit)).encode() in result.body
    assert result.sent < getattr(server.service.limits, limit) + 8 * MB  # refused early, not read whole
    assert result.seconds < 5.0
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_declared_length_over_the_limit_is_refused_unread(server):
    r = httpx.post(f"{server.url}/v1/feedback", content=b"x" * (server.service.limits.max_body_bytes + 1),
                   headers=_auth(server, "acme"), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_health_answers_and_rss_stays_flat_during_a_48mb_chunked_body(server):
    before = rss_bytes()
    with health_pings(server.url) as latencies:
        time.sleep(0.1)
        results = [send_chunked(server.port, "/v1/chat/completions", chat_body(48 * MB, "acme/alice/style"),
                                headers=_auth(server, "acme")) for _ in range(3)]
    grown = rss_bytes() - before
    assert [r.status for r in results] == [413] * 3
    assert len(latencies) >= 5
    assert float(np.percentile(latencies, 99)) < 0.5, sorted(latencies)[-5:]  # benchmark target: < 50 ms
    assert grown < 50 * MB, f"RSS grew by {grown / MB:.1f} MB"


def test_prompt_over_the_character_limit_is_refused_before_tokenizing(server):
    chars = server.service.limits.max_prompt_chars
    messages = [{"role": "user", "content": "word " * 3000}] * 256  # 3.84 M characters, a 3.9 MB body
    t = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=_auth(server, "acme"), timeout=60,
                   json={"model": "acme/alice/style", "messages": messages, "max_tokens": 2})
    took = time.perf_counter() - t
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "prompt_too_long" and err["param"] == "messages"
    assert "3840000 characters" in err["message"] and str(chars) in err["message"]
    assert took < 3.0  # tokenizing 3.84 M characters would take far longer on this machine


@pytest.mark.parametrize("route", ["chat", "completion"])
def test_prompt_over_the_token_limit_is_refused(server, route):
    text = "a " * 30_000  # 60,000 characters (within the character limit), ~30,000 tokens
    body = ({"messages": [{"role": "user", "content": text}]} if route == "chat" else {"prompt": text})
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    r = httpx.post(f"{server.url}{path}", headers=_auth(server, "acme"), timeout=60,
                   json={"model": "acme/alice/style", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "prompt_too_long"
    assert f"limit is {server.service.limits.max_prompt_tokens}" in err["message"] and "tokens" in err["message"]
    ok = httpx.post(f"{server.url}{path}", headers=_auth(server, "acme"), timeout=60,
                    json={"model": "acme/alice/style", "max_tokens": 2,
                          **({"messages": [{"role": "user", "content": "hi"}]} if route == "chat" else {"prompt": "hi"})})
    assert ok.status_code == 200, ok.text


def test_metrics_need_an_admin_key_unless_public(server, monkeypatch):
    url = f"{server.url}/metrics"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers=_auth(server, "acme"), timeout=10).status_code == 403
    r = httpx.get(url, headers=_auth(server, "admin"), timeout=10)
    assert r.status_code == 200 and "lorafleet_http_requests_total" in r.text
    monkeypatch.setattr(server.service, "metrics_public", True)  # lorafleet serve --metrics-public
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and "lorafleet_http_requests_total" in r.text


@pytest.mark.parametrize(("config_patch", "match"), [
    ('"target_modules": [["q_proj"]]', "target_modules must be a list of module names"),
    ('"target_modules": [5]', "target_modules must be a list of module names"),
    ('"x": ' + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('"bias": ' + "[" * 900 + "]" * 900, "is not supported"),
], ids=["nested-targets", "int-targets", "deep-config", "deep-bias"])
def test_crashing_adapter_configs_are_422_and_commit_nothing(server, admin_client, config_patch, match):
    import json

    from lorafleet.adapters import LoraAdapter, LoraSpec, peft_io

    adapter = LoraAdapter.create(server.base, LoraSpec(rank=4, alpha=8, target_modules="attention"), seed=9,
                                 init="random")
    config = json.dumps({k: v for k, v in peft_io.peft_config(adapter).items() if k != "target_modules"
                         or "target_modules" not in config_patch})[:-1] + ", " + config_patch + "}"
    files = {"adapter_config.json": config.encode(), "adapter_model.safetensors": peft_io.peft_weights_bytes(adapter)}
    ref = "initech/hostile/cfg"
    admin_client.post("/v1/adapters", json={"ref": ref})
    before = admin_client.get(f"/v1/adapters/{ref}/revisions").json()["data"]
    r = admin_client.post(f"/v1/adapters/{ref}/revisions",
                          files=[("files", (n, d, "application/octet-stream")) for n, d in files.items()])
    assert r.status_code == 422, r.text[:300]
    assert r.json()["error"]["code"] == "invalid_adapter" and match in r.json()["error"]["message"]
    assert admin_client.get(f"/v1/adapters/{ref}/revisions").json()["data"] == before


def test_docs_limits_table_matches_the_code():
    import dataclasses
    import re
    from pathlib import Path

    from lorafleet.api.service import Limits

    doc = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    rows = dict(re.findall(r"^\| `(max_\w+)` \| ([^|]+) \|", doc, flags=re.M))
    fields = {f.name: f.default for f in dataclasses.fields(Limits)}
    assert set(rows) == set(fields), (set(rows) ^ set(fields))
    for name, text in rows.items():
        text = text.strip().replace(",", "")
        value = int(text.split()[0]) * (1024 * 1024 if text.endswith("MiB") else 1)
        assert value == fields[name], (name, text, fields[name])


@pytest.mark.slow  # a whole `lorafleet serve` process start (~30 s on the shared 2-core machine)
def test_serve_metrics_public_flag(tmp_path):
    """`lorafleet serve --metrics-public` (a real process on loopback): /metrics answers without a key."""
    import os
    import subprocess
    import sys

    from lorafleet.testing.pgtest import free_port

    port = free_port()
    env = {**os.environ, "LORAFLEET_HOME": str(tmp_path), "LORAFLEET_BASE": "tiny", "OMP_NUM_THREADS": "1",
           "LORAFLEET_ADMIN_KEY": "lf-admin-" + "0" * 32}
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "serve", "--port", str(port), "--no-worker",
                             "--metrics-public"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert r.status_code == 200 and "lorafleet_http_requests_total" in r.text
    finally:
        proc.terminate()
        proc.wait(30)
