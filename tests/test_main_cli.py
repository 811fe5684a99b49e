"""The CLI end to end on the tiny base (commands a user types, exit codes, JSON output)."""

import json

import pytest
from typer.testing import CliRunner

from lorafleet.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def tiny_base_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLEET_BASE", "tiny")
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))


def test_base_info_json():
    result = runner.invoke(app, ["base", "info", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["name"] == "tiny-llama:0" and len(info["fingerprint"]) == 64


def test_lora_new_inspect_generate(tmp_path):
    d = tmp_path / "ad"
    result = runner.invoke(app, ["lora", "new", str(d), "--rank", "4", "--targets", "mlp", "--init", "random"])
    assert result.exit_code == 0, result.output
    assert (d / "adapter_model.safetensors").is_file()
    result = runner.invoke(app, ["lora", "inspect", str(d), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rank"] == 4
    result = runner.invoke(app, ["generate", "hello", "--adapter", str(d), "--compare", "--max-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output)) == {"adapter", "base"}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["lora", "new", "X", "--rank", "0"], "rank must be an integer"),
        (["lora", "new", "X", "--targets", "c_attn"], "unknown target module"),
        (["lora", "inspect", "/nonexistent/adapter"], "does not exist"),
        (["generate", "hi", "--adapter", "/nonexistent/adapter"], "does not exist"),
        (["base", "info", "--base", "nope-model"], "unknown base"),
    ],
)
def test_cli_errors_are_clear(args, match, tmp_path):
    args = [a.replace("X", str(tmp_path / "x")) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "error:" in result.output and __import__("re").search(match, result.output)
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_demo_quick_runs_twice_without_duplicates(tmp_path):
    """`lorafleet demo --quick` end to end (tiny base); a second run reuses its users instead of duplicating."""
    from lorafleet.registry import Registry

    result = runner.invoke(app, ["demo", "--quick"])
    assert result.exit_code == 0, result.output
    for step in ("the fleet", "one batch, every row a different user", "lifecycle", "report:", "demo finished",
                 "ahab: adapter", "vs in-context", "prompt tokens saved per request"):
        assert step in result.output, step
    reg = Registry.open_default()
    first = {a.ref: a.latest for a in reg.list_adapters(tenant="demo")[0]}
    assert len(first) == 6 and first["demo/ahab/assistant"] == 2
    result = runner.invoke(app, ["demo", "--quick"])
    assert result.exit_code == 0, result.output
    assert "reusing them" in result.output
    assert {a.ref: a.latest for a in reg.list_adapters(tenant="demo")[0]} == first
    reg.close()
