"""``lorafleet schedule set|show``, ``lorafleet memory show|export|capture|forget`` and ``lorafleet forget``."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.cli import app
from lorafleet.registry import Provenance, Registry
from lorafleet.registry.memory import MemoryStore

runner = CliRunner()
REF = "acme/alice/assistant"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAFLEET_DB_URL", raising=False)
    monkeypatch.delenv("LORAFLEET_BLOB_URL", raising=False)
    reg = Registry()
    weights = {"model.layers.0.self_attn.q_proj": (torch.ones(1, 4), torch.zeros(4, 1))}
    reg.commit(REF, to_bytes(LoraAdapter(LoraSpec(rank=1, target_modules="q_proj"), weights)), Provenance(base_fingerprint="f" * 64), aliases=("live",))
    yield reg
    reg.close()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_schedule_set_and_show(home):
    r = run("schedule", "set", REF, "--min-examples", "4", "--every-hours", "12", "--capture", "--gate",
            "max_habit_drop=0.2", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["capture"] and data["enabled"] and data["policy"]["min_examples"] == 4
    assert data["policy"]["gate"] == {"max_habit_drop": 0.2} and data["policy"]["steps"] == 20
    r = run("schedule", "set", REF, "--steps", "5", "--disable", "--json")  # other fields kept
    data = json.loads(r.output)
    assert not data["enabled"] and data["policy"]["min_examples"] == 4 and data["policy"]["steps"] == 5
    r = run("schedule", "show", REF)
    assert r.exit_code == 0 and "policy.min_examples" in r.output


BAD = [
    (("schedule", "set", REF, "--method", "rlhf"), "method"),
    (("schedule", "set", REF, "--gate", "max_habit_drop"), "KEY=VALUE"),
    (("schedule", "set", REF, "--gate", "max_habit_drop=lots"), "not a number"),
    (("schedule", "set", "acme/nobody/x", "--steps", "3"), "does not exist"),
    (("schedule", "show", "acme/nobody/x"), "does not exist"),
    (("memory", "show", "acme"), "expected tenant/user"),
    (("memory", "capture", REF, "maybe"), "'on' or 'off'"),
    (("forget", "ACME/alice", "--yes"), "invalid tenant"),
]


@pytest.mark.parametrize(("args", "match"), BAD)
def test_bad_input_exits_2_and_changes_nothing(home, args, match):
    r = run(*args)
    assert r.exit_code == 2 and match in r.output, r.output
    assert MemoryStore(home).settings(REF).policy == {}


def test_memory_show_export_forget(home, tmp_path):
    assert run("memory", "capture", REF, "on").exit_code == 0
    store = MemoryStore(home)
    store.record(REF, "resp-1", prompt=[{"role": "user", "content": "hi"}], response="hello", revision=1)
    store.add_feedback("resp-1", rewrite="hello there")
    r = run("memory", "show", "acme/alice", "--json")
    shown = json.loads(r.output)
    assert shown["interactions"] == 1 and shown["adapters"]["assistant"]["examples"] == 1
    out = tmp_path / "alice.json"
    assert run("memory", "export", "acme/alice", "-o", str(out)).exit_code == 0
    exported = json.loads(out.read_text())
    assert exported["interactions"][0]["response"] == "hello" and exported["feedback"][0]["record"]
    r = run("forget", "acme/alice", "--yes")
    assert r.exit_code == 0 and "forgot acme/alice: 1 adapter(s), 1 revision(s), 1 interaction(s)" in r.output
    assert json.loads(run("memory", "show", "acme/alice", "--json").output)["interactions"] == 0
    assert home.list_adapters(tenant="acme")[0] == []
    r = run("memory", "forget", "acme/alice", "--yes")  # nothing left: still fine
    assert r.exit_code == 0 and "0 adapter(s)" in r.output
