"""``lorafleet adapters import`` / ``export`` through typer's CliRunner on the tiny base."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lorafleet.adapters.gguf_io import read_gguf_lora
from lorafleet.base import load_base
from lorafleet.cli import app
from lorafleet.registry import NotFoundError, Registry

runner = CliRunner()


@pytest.fixture
def env(cli_home):
    return cli_home


def _folders(tmp_path, names, bad=()):
    for i, name in enumerate(names):
        torch.manual_seed(i)
        model = get_peft_model(copy.deepcopy(load_base("tiny").model),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
        model.save_pretrained(tmp_path / "many" / name)
        if name in bad:
            path = tmp_path / "many" / name / "adapter_model.safetensors"
            tensors = load_file(path)
            tensors[sorted(tensors)[0]][0, 0] = float("nan")
            save_file(tensors, path)
    return tmp_path / "many"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_import_table_json_and_one_bad(env):
    many = _folders(env, ["alice", "bob", "carol"], bad=("bob",))
    res = run("adapters", "import", many, "--as", "acme/team")
    assert res.exit_code == 2
    assert "imported 2 of 3" in res.stdout and "README.md" in res.stdout and "failed" in res.stdout
    assert "bob" in res.stderr and "NaN or Inf" in res.stderr
    with Registry.open_default() as reg:
        assert reg.resolve("acme/team/alice@candidate").provenance.method == "import"
        with pytest.raises(NotFoundError):
            reg.get_adapter("acme/team/bob")
    res = run("adapters", "import", many / "alice", "--as", "acme/team/alice", "--alias", "live", "--json")
    assert res.exit_code == 0, res.output
    [r] = json.loads(res.stdout)["results"]
    assert r["status"] == "unchanged" and r["number"] == 1
    with Registry.open_default() as reg:
        assert reg.get_adapter("acme/team/alice").aliases == {"candidate": 1, "live": 1}


def test_import_strict_and_bad_arguments(env):
    many = _folders(env, ["a1", "b2"], bad=("a1",))
    res = run("adapters", "import", many, "--as", "acme/t", "--strict")
    assert res.exit_code == 2 and "a1" in res.stderr and "NaN or Inf" in res.stderr
    assert res.stderr.count("error:") == 1
    for args, msg in [(["--as", "acme/t/x"], "names one adapter"), (["--alias", "beta"], "candidate"),
                      (["--as", "Bad/x"], "invalid tenant segment")]:
        res = run("adapters", "import", many, *args)
        assert res.exit_code == 2 and msg in res.output
    res = run("adapters", "import", env / "nope")
    assert res.exit_code == 2 and "does not exist" in res.stderr
    with Registry.open_default() as reg:
        assert reg.list_adapters()[0] == []


def test_export_peft_and_gguf(env):
    many = _folders(env, ["alice"])
    assert run("adapters", "import", many / "alice", "--as", "acme/a/x", "--alias", "live").exit_code == 0
    res = run("adapters", "export", "acme/a/x", env / "out-peft", "--format", "peft")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (env / "out-peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    res = run("adapters", "export", "acme/a/x#1", env / "out-gguf", "--format", "gguf", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["files"] == ["adapter_model.gguf"]
    assert read_gguf_lora(env / "out-gguf" / "adapter_model.gguf")["adapter_type"] == "lora"
    res = run("adapters", "export", "acme/a/x", env / "out-peft")
    assert res.exit_code == 2 and "not empty; pass --force" in res.stderr
    assert run("adapters", "export", "acme/a/x", env / "out-peft", "--force").exit_code == 0
    res = run("adapters", "export", "acme/a/x", env / "o3", "--format", "onnx")
    assert res.exit_code == 2 and "peft, gguf" in res.output and not (env / "o3").exists()
    res = run("adapters", "export", "acme/a/nope", env / "o4")
    assert res.exit_code == 2 and "does not exist" in res.stderr and not (env / "o4").exists()
