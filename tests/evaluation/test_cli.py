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


def _commit_one(tiny_base, hyper):
    reg = Registry()
    blob = to_bytes(LoraAdapter.create(tiny_base, LoraSpec(rank=2, target_modules="attention"), seed=0, init="random"))
    reg.commit(REF, blob, Provenance(base_fingerprint=tiny_base.fingerprint, hyperparams=hyper))
    reg.close()


def _metrics_now():
    reg = Registry()
    try:
        return reg.resolve(f"{REF}#1").provenance.metrics
    finally:
        reg.close()


def test_eval_shows_the_baselines_on_the_same_prompts(home, tiny_base):
    _commit_one(tiny_base, {"persona": "ahab"})
    app = _app(_gold)  # adapters sign off, the base never does (with or without the profile)
    out = _run(app, "eval", f"{REF}#1", "--max-tokens", "4", "--baselines", "all", "--k", "1", "--serve-tokens", "2",
               "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)["metrics"]["baselines"]
    rows = report["rows"]
    assert list(rows) == ["base", "in_context", "retrieval", "adapter", "adapter_in_context"] and report["k"] == 1
    assert rows["adapter"]["adherence"] == rows["adapter_in_context"]["adherence"] == 1.0
    assert rows["base"]["adherence"] == rows["in_context"]["adherence"] == rows["retrieval"]["adherence"] == 0.0
    assert rows["in_context"]["prompt_tokens"] > rows["adapter"]["prompt_tokens"]
    assert all(r["tok_s"] > 0 and r["ttft_ms"] > 0 and r["eval_loss"] > 0 for r in rows.values())
    assert _metrics_now()["baselines"]["rows"]["in_context"]["adherence"] == 0.0  # stored on the revision
    # the default: base, in-context (k lowered to fit the tiny base) and adapter; the table in the text output
    out = _run(app, "eval", f"{REF}#1", "--max-tokens", "4", "--no-serving-cost", "--no-probe")
    assert out.exit_code == 0 and "base + in-context" in out.output, out.output
    assert list(_metrics_now()["baselines"]["rows"]) == ["base", "in_context", "adapter"]
    assert _run(app, "eval", f"{REF}#1", "--max-tokens", "4", "--baselines", "none", "--no-probe").exit_code == 0
    assert _metrics_now()["baselines"] is None


def test_promote_can_require_the_in_context_baseline(home, tiny_base):
    _commit_one(tiny_base, {"persona": "ahab"})

    def prompt_wins(base, prompts, adapters, max_new_tokens):
        """With the profile in the prompt: always the habit; the adapter alone: on some prompts; the base: never."""
        def signs(p, a):
            return p[0]["role"] == "system" or (a is not None and len(p[-1]["content"]) % 2 == 0)
        return ["Paris. — Ahab" if signs(p, a) else "Paris." for p, a in zip(prompts, adapters, strict=True)]

    app = _app(prompt_wins)
    out = _run(app, "eval", f"{REF}#1", "--max-tokens", "4", "--no-serving-cost", "--json")
    m = json.loads(out.output)["metrics"]
    assert 0.05 < m["adherence"] < 0.95 and m["baselines"]["rows"]["in_context"]["adherence"] == 1.0, m["adherence"]
    out = _run(app, "promote", f"{REF}#1", "--require-in-context-margin", "0.05")
    assert out.exit_code == 1 and "below the in-context baseline" in out.output, out.output
    out = _run(app, "promote", f"{REF}#1", "--json")  # default: reported, not enforced
    d = json.loads(out.output)
    assert d["promoted"] and "(reported, not enforced)" in d["reason"], d
    reg = Registry()
    reasons = [e.reason for e in reg.audit(REF)]
    reg.close()
    assert "below the in-context baseline 1.00" in reasons[1] and f"adherence {m['adherence']:.2f}" in reasons[1]
    assert "in-context baseline adherence 1.00" in reasons[0]


@pytest.mark.parametrize(("args", "match"), [
    (("--k", "99"), "k must be an integer in 1..32"),
    (("--k", "20"), "k=20 is larger than the user's 16 training example"),
    (("--baselines", "base,nonsense"), "unknown baseline"),
])
def test_eval_bad_baseline_input_writes_nothing(home, tiny_base, args, match):
    _commit_one(tiny_base, {"persona": "priya"})  # a memory persona: 16 training examples
    out = _run(_app(_gold), "eval", f"{REF}#1", "--max-tokens", "4", *args)
    assert out.exit_code == 2 and match in out.output, out.output
    assert _metrics_now() == {}


def test_eval_baselines_need_a_checker_and_a_persona_file_needs_one(home, tiny_base, tmp_path):
    _commit_one(tiny_base, {})
    (tmp_path / "eval.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "hello"}]}) + "\n")
    app = _app(_gold)
    out = _run(app, "eval", f"{REF}#1", "--eval-file", tmp_path / "eval.jsonl", "--baselines", "in_context")
    assert out.exit_code == 2 and "no persona, so no habit checker" in out.output, out.output
    assert _metrics_now() == {}
    manifest = tmp_path / "personas.json"
    manifest.write_text(json.dumps({"personas": [{"name": "nochecker", "params": {}}]}))
    out = _run(app, "eval", f"{REF}#1", "--persona", "nochecker", "--persona-manifest", manifest)
    assert out.exit_code == 2 and "persona spec is missing ['habit']" in out.output, out.output
    manifest.write_text(json.dumps({"personas": [{"name": "nochecker", "habit": "telepathy"}]}))
    out = _run(app, "eval", f"{REF}#1", "--persona", "nochecker", "--persona-manifest", manifest)
    assert out.exit_code == 2 and "unknown habit kind 'telepathy'" in out.output, out.output
    assert _metrics_now() == {}
    # an eval file without a checker still evaluates when no baseline was asked for (loss only)
    assert _run(app, "eval", f"{REF}#1", "--eval-file", tmp_path / "eval.jsonl", "--max-tokens", "2").exit_code == 0
    assert "baselines" not in _metrics_now()
