"""adapter_config.json shapes that used to crash the PEFT validator (issue 20, item 3): a clear AdapterError in
the library, one ``error:`` line and exit 2 on the CLI (the HTTP upload's 422 is in tests/api/test_hostile_http.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lorafleet.adapters import AdapterError, LoraAdapter, LoraSpec, load_peft, peft_io
from lorafleet.cli import app

DEEP = 100_000


def hostile_configs(config: dict) -> dict[str, tuple[str, str]]:
    """name -> (adapter_config.json text, what the error says)."""
    nested_list = "[" * DEEP + "]" * DEEP
    inside_limit = "[" * 900 + "]" * 900  # parses, but recursing over it (repr, ==) would overflow the stack
    return {
        "nested-targets": (json.dumps({**config, "target_modules": [["q_proj"]]}), "target_modules must be a list"),
        "int-targets": (json.dumps({**config, "target_modules": [5]}), "target_modules must be a list"),
        "dict-targets": (json.dumps({**config, "target_modules": {"q_proj": 1}}), "target_modules must be a list"),
        "deep-config": (json.dumps(config)[:-1] + ', "x": ' + nested_list + "}", "nested too deeply"),
        "deep-targets": (json.dumps(config)[:-1] + ', "target_modules": ' + nested_list + "}", "nested too deeply"),
        "deep-bias": (json.dumps(config)[:-1] + ', "bias": ' + inside_limit + "}", "bias=[[[[[[[...]]]]]]] is not supported"),
        "deep-peft-type": (json.dumps(config)[:-1] + ', "peft_type": ' + inside_limit + "}", "is not supported"),
        "deep-base-name": (json.dumps(config)[:-1] + ', "base_model_name_or_path": ' + inside_limit + "}",
                           "base_model_name_or_path must be a string"),
    }


@pytest.fixture(scope="module")
def peft_dir(tiny_base, tmp_path_factory):
    adapter = LoraAdapter.create(tiny_base, LoraSpec(rank=4, target_modules="attention"), seed=1, init="random")
    return peft_io.save_peft(adapter, tmp_path_factory.mktemp("peft") / "ad")


CASES = list(hostile_configs({"r": 4}))


@pytest.mark.parametrize("case", CASES)
def test_library_raises_adapter_error(tiny_base, peft_dir, tmp_path, case):
    config = json.loads((peft_dir / peft_io.CONFIG_FILE).read_text())
    text, match = hostile_configs(config)[case]
    d = tmp_path / "ad"
    d.mkdir()
    (d / peft_io.CONFIG_FILE).write_text(text)
    (d / peft_io.WEIGHTS_FILE).write_bytes((peft_dir / peft_io.WEIGHTS_FILE).read_bytes())
    with pytest.raises(AdapterError, match=match.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_peft(d, tiny_base)


@pytest.mark.parametrize("case", ["nested-targets", "deep-config", "deep-bias"])
def test_cli_inspect_prints_one_error_line_and_exits_2(peft_dir, tmp_path, monkeypatch, case):
    monkeypatch.setenv("LORAFLEET_BASE", "tiny")
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    config = json.loads((peft_dir / peft_io.CONFIG_FILE).read_text())
    d = tmp_path / "ad"
    d.mkdir()
    (d / peft_io.CONFIG_FILE).write_text(hostile_configs(config)[case][0])
    (d / peft_io.WEIGHTS_FILE).write_bytes((peft_dir / peft_io.WEIGHTS_FILE).read_bytes())
    result = CliRunner().invoke(app, ["lora", "inspect", str(d)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output


def test_spec_refuses_non_string_targets():
    with pytest.raises(AdapterError, match="target_modules must be a list of module names"):
        LoraSpec(target_modules=(["q_proj"],))
    with pytest.raises(AdapterError, match="target_modules must be a list of module names"):
        LoraSpec(target_modules=5)
