"""The evaluation CLI, mounted on a fresh Typer app with ``register``."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.cli.evaluate import register
from lorafleet.registry import Provenance, Registry

REF = "acme/alice/assistant"
runner = CliRunner()


def _app(backend=None):
    a = typer.Typer()
    register(a, backend=backend)
    return a


@pytest.fixture
def app():
    return _app()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    monkeypatch.delenv("LORAFLEET_DB_URL", raising=False)
    monkeypatch.delenv("LORAFLEET_BLOB_URL", raising=False)
    monkeypatch.setenv("LORAFLEET_BASE", "tiny")
    return tmp_path


def _run(app, *args):
    return runner.invoke(app, [str(a) for a in args])


def test_personas_ls_show_generate(app, tmp_path):
    out = _run(app, "personas", "ls", "--json")
    assert out.exit_code == 0, out.output
    names = [p["name"] for p in json.loads(out.output)]
    assert "ahab" in names and len(names) >= 8
    out = _run(app, "personas", "show", "wxbot", "--split", "train", "--limit", "2", "--json")
    shown = json.loads(out.output)
    assert shown["count"] == 48 and len(shown["records"]) == 2 and shown["habit"] == "tool_call"
    assert "— Ahab" in _run(app, "personas", "show", "ahab").output
    out = _run(app, "personas", "generate", "--count", "3", "--seed", "4", "--out", tmp_path / "gen", "--n-train", "5")
    assert out.exit_code == 0, out.output
    manifest = tmp_path / "gen" / "personas.json"
    assert len(json.loads(manifest.read_text())["personas"]) == 3
    listed = json.loads(_run(app, "personas", "ls", "--persona-manifest", manifest, "--json").output)
    assert listed[0]["n_train"] == 5
    bad = _run(app, "personas", "show", "nobody")
    assert bad.exit_code == 2 and "no persona named 'nobody'" in bad.output


def _gold(base, prompts, adapters, max_new_tokens):
    """Adapters always sign off like ahab; the base never does."""
    return ["Paris is nice. — Ahab" if a is not None else "Paris is nice." for a in adapters]


def test_eval_promote_report_rollback(home, tiny_base):
    reg = Registry()
    spec = LoraSpec(rank=2, target_modules="attention")
    for seed in (0, 1):
        blob = to_bytes(LoraAdapter.create(tiny_base, spec, seed=seed, init="random"))
        reg.commit(REF, blob, Provenance(base_fingerprint=tiny_base.fingerprint, hyperparams={"persona": "ahab"}))
    reg.close()
    app = _app(_gold)

    out = _run(app, "eval", f"{REF}#1", "--max-tokens", "4", "--json")
    assert out.exit_code == 0, out.output
    m = json.loads(out.output)["metrics"]
    assert m["persona"] == "ahab" and m["adherence"] == 1.0 and m["base_adherence"] == 0.0

    out = _run(app, "promote", f"{REF}#1", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["promoted"] is True

    # #2 is not evaluated yet: promote evaluates it first, then refuses (adherence not higher than live's)
    out = _run(app, "promote", f"{REF}#2", "--loss-margin", "100")
    assert out.exit_code == 1 and "refused" in out.output

    out = _run(app, "promote", f"{REF}#2", "--force", "--reason", "trust me", "--actor", "ops:eve")
    assert out.exit_code == 0 and "forced promotion" in out.output

    out = _run(app, "report", REF, "--json")
    report = json.loads(out.output)
    assert [r["number"] for r in report["revisions"]] == [1, 2]
    assert report["revisions"][1]["provenance"]["metrics"]["gate"]["decision"] == "forced"
    assert report["audit"][0]["actor"] == "ops:eve"
    assert "audit log" in _run(app, "report", REF).output

    out = _run(app, "rollback", REF, "--reason", "oops")
    assert out.exit_code == 0 and "#2 → #1" in out.output
    assert _run(app, "rollback", REF, "--to", "9").exit_code == 2


def test_eval_without_persona_is_a_clear_error(app, home, tiny_base):
    reg = Registry()
    reg.commit(REF, to_bytes(LoraAdapter.create(tiny_base, LoraSpec(rank=2), seed=0)),
               Provenance(base_fingerprint=tiny_base.fingerprint))
    reg.close()
    out = _run(app, "eval", f"{REF}#1")
    assert out.exit_code == 2 and "no persona or eval set" in out.output
    out = _run(app, "eval", f"{REF}#7", "--persona", "ahab")
    assert out.exit_code == 2 and "error" in out.output


def test_stack_report_cli_flags_a_member_and_moves_nothing(home, tiny_base):
    """The member signs off only while the org level it was evaluated on is live (a stand-in backend)."""
    import torch  # noqa: PLC0415

    from lorafleet.adapters.stack import AdapterStack  # noqa: PLC0415

    spec = LoraSpec(rank=2, target_modules="attention")
    org1, org2, member = (LoraAdapter.create(tiny_base, spec, seed=s, init="random") for s in (5, 6, 7))
    name = next(iter(org1.weights))
    reg = Registry()
    reg.create_adapter("acme/_org/support")
    reg.create_adapter(REF, parent="acme/_org/support")
    prov = Provenance(base_fingerprint=tiny_base.fingerprint, hyperparams={"persona": "ahab"})
    reg.set_alias("acme/_org/support", "live", reg.commit("acme/_org/support", to_bytes(org1), prov).number)
    reg.set_alias(REF, "live", reg.commit(REF, to_bytes(member), prov).number)
    reg.close()

    def backend(base, prompts, adapters, max_new_tokens):
        def on_org1(a):
            return isinstance(a, AdapterStack) and torch.equal(a.levels[0].weights[name][0], org1.weights[name][0])
        return ["Paris is nice. — Ahab" if on_org1(a) else "Paris is nice." for a in adapters]

    app = _app(backend)
    assert _run(app, "eval", REF, "--max-tokens", "4").exit_code == 0
    out = _run(app, "stack-report", "acme/_org/support", "--json")
    assert out.exit_code == 0 and json.loads(out.output)["members"][0]["status"] == "unchanged", out.output
    reg = Registry()
    reg.set_alias("acme/_org/support", "live", reg.commit("acme/_org/support", to_bytes(org2), prov).number)
    reg.close()
    out = _run(app, "stack-report", "acme/_org/support")
    assert out.exit_code == 1 and "flagged" in out.output and "adherence fell" in out.output, out.output
    reg = Registry()
    assert reg.resolve(REF).number == 1 and reg.audit(REF)[0].action == "alias.set"
    reg.close()
    assert _run(app, "stack-report", "acme/_org/nothing").exit_code == 2


def test_the_backend_is_no_command_line_option(app):
    for cmd in ("eval", "promote", "stack-report"):
        out = _run(app, cmd, "--help")
        assert out.exit_code == 0 and "--base" in out.output, cmd
        assert "backend" not in out.output, cmd
