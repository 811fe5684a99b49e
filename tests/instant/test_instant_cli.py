"""``lorafleet adapters create T/U/A --from-profile`` end to end on the tiny base."""

import json

import pytest
from typer.testing import CliRunner

from lorafleet.base import load_base
from lorafleet.cli import app
from lorafleet.config import Settings
from lorafleet.instant import commit_generator, default_generator_ref
from lorafleet.registry import Registry
from lorafleet.testing.instant import synthetic_generator

runner = CliRunner()


@pytest.fixture(scope="module")
def gen():
    base = load_base("tiny")
    return base, synthetic_generator(base, corpus_digest="2" * 64)


@pytest.fixture()
def home(monkeypatch, tmp_path, gen):
    monkeypatch.setenv("LORAFLEET_BASE", "tiny")
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    base, generator = gen
    with Registry.open_default(Settings.from_env()) as reg:
        commit_generator(reg, generator, default_generator_ref(base))
    return tmp_path


def test_create_from_profile_with_examples(home):
    ex = home / "ex.jsonl"
    ex.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello! — Kim"}]}) + "\n")
    r = runner.invoke(app, ["adapters", "create", "acme/ann/style", "--from-profile",
                            "always ends with the sign-off 'Best, Kim'", "--examples", str(ex), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["number"] == 1 and out["provenance"]["method"] == "generated"
    assert out["provenance"]["hyperparams"]["examples"] == 1 and out["generation_seconds"] > 0
    r = runner.invoke(app, ["adapters", "history", "acme/ann/style", "--json"])
    assert r.exit_code == 0 and len(json.loads(r.output)) == 1


@pytest.mark.parametrize(("args", "match"), [
    (["--from-profile", ""], "profile is empty"),
    (["--from-profile", "x", "--examples", "/nonexistent.jsonl"], "cannot read --examples"),
    (["--from-profile", "x", "--parent", "acme/_org/a"], "takes no --parent"),
    (["--from-profile", "x", "--generator", "acme/none/gen"], "no generator"),
    (["--examples", "x.jsonl"], "go with --from-profile"),
])
def test_bad_input_exits_2_and_commits_nothing(home, args, match):
    r = runner.invoke(app, ["adapters", "create", "acme/bob/style", *args])
    assert r.exit_code == 2, r.output
    assert match in r.output
    r = runner.invoke(app, ["adapters", "show", "acme/bob/style"])
    assert r.exit_code != 0


def test_build_generator_then_create(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLEET_BASE", "tiny")
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    r = runner.invoke(app, ["adapters", "build-generator", "--personas", "4", "--steps", "1", "--pack", "4",
                            "--max-len", "192", "--json"])
    assert r.exit_code == 0, r.output
    rev = json.loads(r.output[r.output.index("{"):])
    assert rev["address"] == "_instant/generators/tiny-llama-0#1" and rev["provenance"]["method"] == "instant-generator"
    assert rev["provenance"]["hyperparams"]["personas"] == 4 and "live" in rev["aliases"]
    r = runner.invoke(app, ["adapters", "create", "acme/zed/style", "--from-profile", "writes in all lowercase",
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["provenance"]["hyperparams"]["generator"] == "_instant/generators/tiny-llama-0#1"
