"""``lorafleet adapters ...`` through typer's CliRunner against the registry sub-app."""

from __future__ import annotations

import json

import pytest
from registry_helpers import REF, blob, prov
from typer.testing import CliRunner

from lorafleet.cli.adapters import app
from lorafleet.registry import Registry

runner = CliRunner()


@pytest.fixture
def env(cli_home):
    with Registry.open_default() as reg:
        for i in range(3):
            reg.commit(REF, blob(f"w{i}".encode()), prov(method="sft"))
        reg.set_alias(REF, "live", 2, actor="gate", reason="passed")
    return cli_home


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_ls_and_json(env):
    res = invoke("create", "acme/bob/notes", "-d", "notes")
    assert res.exit_code == 0 and "created" in res.stdout
    res = invoke("ls")
    assert res.exit_code == 0 and REF in res.stdout and "acme/bob/notes" in res.stdout
    data = json.loads(invoke("ls", "--json", "--limit", "1").stdout)
    assert [a["ref"] for a in data["adapters"]] == ["acme/alice/assistant"] and data["next_cursor"]
    page2 = json.loads(invoke("ls", "--json", "--limit", "1", "--cursor", data["next_cursor"]).stdout)
    assert [a["ref"] for a in page2["adapters"]] == ["acme/bob/notes"] and page2["next_cursor"] is None
    assert "more: --cursor" in invoke("ls", "--limit", "1").stdout
    assert json.loads(invoke("ls", "--json", "--user", "bob").stdout)["adapters"][0]["description"] == "notes"


def test_show_and_history(env):
    res = invoke("show", REF)
    assert res.exit_code == 0 and f"{REF}#2" in res.stdout and "sft" in res.stdout
    shown = json.loads(invoke("show", f"{REF}#3", "--json").stdout)
    assert shown["revision"]["number"] == 3 and shown["revision"]["aliases"] == ["candidate"]
    assert shown["adapter"]["aliases"] == {"candidate": 3, "live": 2}
    hist = json.loads(invoke("history", REF, "--json").stdout)
    assert [r["number"] for r in hist] == [1, 2, 3]
    assert "candidate" in invoke("history", REF).stdout
    invoke("create", "acme/bob/empty")
    assert "no live revision" in invoke("show", "acme/bob/empty").stdout


def test_alias_rollback_and_audit(env):
    res = invoke("alias", REF, "live", "3", "--reason", "better", "--actor", "ops")
    assert res.exit_code == 0 and "#2 → #3" in res.stdout
    res = invoke("rollback", REF, "--reason", "regression", "--json")
    entry = json.loads(res.stdout)
    assert (entry["action"], entry["from_number"], entry["to_number"]) == ("rollback", 3, 2)
    assert entry["actor"].startswith("cli")
    assert invoke("rollback", REF, "--to", "1").exit_code == 0
    res = invoke("alias", REF, "beta", "1")
    assert res.exit_code == 0
    res = invoke("alias", REF, "beta", "--delete", "--reason", "done")
    assert res.exit_code == 0 and "(deleted)" in res.stdout
    log = json.loads(invoke("audit", REF, "--json").stdout)
    assert [e["action"] for e in log[:3]] == ["alias.delete", "alias.set", "rollback"]
    assert log[-1]["reason"] == "commit acme/alice/assistant#1"
    assert "regression" in invoke("audit", "--limit", "100").stdout


def test_gc_command(env):
    dry = json.loads(invoke("gc", "--keep-last", "1", "--dry-run", "--grace", "0", "--json").stdout)
    assert dry["dry_run"] and dry["deleted_revisions"] == [f"{REF}#1"]
    res = invoke("gc", "--keep-last", "1", "--grace", "0")
    assert res.exit_code == 0 and "deleted 1 revisions and 1 blobs" in res.stdout
    assert [r["number"] for r in json.loads(invoke("history", REF, "--json").stdout)] == [2, 3]


CLI_ERRORS = [
    (("show", "Acme/alice/x"), "invalid tenant segment 'Acme'"),
    (("show", f"{REF}#9"), "#9 does not exist"),
    (("history", "acme/nobody/x"), "adapter 'acme/nobody/x' does not exist"),
    (("alias", REF, "live", "42"), "#42 does not exist"),
    (("alias", REF, "Live", "1"), "invalid alias name 'Live'"),
    (("alias", REF, "live"), "give either a revision number N or --delete"),
    (("alias", REF, "nope", "--delete"), "alias 'nope' is not set"),
    (("rollback", "acme/nobody/x"), "does not exist"),
    (("create", REF), "already exists"),
    (("gc", "--keep-last", "0"), "keep_last must be an integer >= 1"),
    (("ls", "--cursor", "garbage"), "invalid cursor"),
    (("audit", "x/y"), "exactly three segments"),
]


@pytest.mark.parametrize(("args", "message"), CLI_ERRORS)
def test_errors_are_one_line_on_stderr_with_exit_2(env, args, message):
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr or pytest.fail(res.stderr)
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception


def test_stack_commands(env):
    """``create --parent``, ``parent`` (validated, exit 2 with the reason), ``stack`` (root first)."""
    res = invoke("create", "acme/_org/support")
    assert res.exit_code == 0
    with Registry.open_default() as reg:
        org = reg.commit("acme/_org/support", blob(b"org"), prov())
        reg.set_alias("acme/_org/support", "live", org.number)
    res = invoke("create", "acme/carol/assistant", "--parent", "acme/_org/support")
    assert res.exit_code == 0 and "on top of acme/_org/support" in res.stdout
    res = invoke("create", "acme/dave/assistant", "--parent", "other/_org/support")
    assert res.exit_code == 2 and "belongs to tenant 'other'" in res.stderr
    res = invoke("parent", REF, "acme/carol/assistant", "--reason", "joined support")
    assert res.exit_code == 0 and "- -> acme/carol/assistant" in res.stdout
    res = invoke("parent", "acme/_org/support", REF)
    assert res.exit_code == 2 and "cycle" in res.stderr
    res = invoke("parent", REF)
    assert res.exit_code == 2 and "PARENT or --detach" in res.stderr
    with Registry.open_default() as reg:
        carol = reg.commit("acme/carol/assistant", blob(b"carol"), prov())
        reg.set_alias("acme/carol/assistant", "live", carol.number)
    levels = json.loads(invoke("stack", REF, "--json").stdout)
    assert [lvl["address"] for lvl in levels] == ["acme/_org/support#1", "acme/carol/assistant#1", f"{REF}#2"]
    res = invoke("stack", REF)
    assert res.exit_code == 0 and "acme/_org/support#1" in res.stdout
    res = invoke("parent", REF, "--detach")
    assert res.exit_code == 0 and json.loads(invoke("show", REF, "--json").stdout)["adapter"]["parent"] is None
