"""One Settings, read from the environment once: every variable, its default, its help, and `lorafleet config`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafleet.cli import app
from lorafleet.config import Settings
from lorafleet.registry import Registry

runner = CliRunner()
ENV = {"LORAFLEET_HOME": "/srv/lf", "LORAFLEET_BASE": "tiny", "LORAFLEET_DB_URL": "postgresql+psycopg://u@h/db",
       "LORAFLEET_BLOB_URL": "s3://bucket/blobs", "LORAFLEET_S3_ENDPOINT": "http://127.0.0.1:9000",
       "LORAFLEET_ADMIN_KEY": "lf-admin-secret", "RAY_ADDRESS": "ray://head:10001"}


def test_every_setting_has_a_variable_and_help_and_is_read():
    s = Settings.from_env(ENV)
    assert s == Settings(home=Path("/srv/lf"), base="tiny", db_url=ENV["LORAFLEET_DB_URL"],
                         blob_url=ENV["LORAFLEET_BLOB_URL"], s3_endpoint=ENV["LORAFLEET_S3_ENDPOINT"],
                         admin_key="lf-admin-secret", ray_address="ray://head:10001")
    names = [f.metadata["env"] for f in dataclasses.fields(Settings)]
    assert sorted(names) == sorted(ENV) and all(f.metadata["help"] for f in dataclasses.fields(Settings))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.base = "other"


def test_defaults_and_empty_means_unset(tmp_path):
    s = Settings.from_env({"LORAFLEET_BASE": "", "LORAFLEET_HOME": str(tmp_path / "h")})
    assert s.base is None and s.db_url is None and s.admin_key is None
    assert s.registry_db_url == f"sqlite:///{tmp_path / 'h' / 'registry.db'}"
    assert s.registry_blob_url == str(tmp_path / "h" / "blobs")
    assert Settings.from_env({}).home == Path("~/.lorafleet")


def test_the_registry_opens_where_the_settings_say(tmp_path):
    s = Settings(home=tmp_path / "home")
    with Registry.open_default(s) as reg:
        assert reg.db_url == s.registry_db_url and (tmp_path / "home" / "registry.db").exists()


def test_lorafleet_config_prints_the_effective_settings(monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LORAFLEET_S3_ENDPOINT", "")
    res = runner.invoke(app, ["config", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["base"] == {"env": "LORAFLEET_BASE", "value": "tiny", "source": "environment",
                           "help": out["base"]["help"]}
    assert out["s3_endpoint"]["value"] is None and out["s3_endpoint"]["source"] == "default"
    assert out["admin_key"]["value"] == "***" and "lf-admin-secret" not in res.output  # a secret stays hidden
    revealed = json.loads(runner.invoke(app, ["config", "--json", "--reveal"]).output)
    assert revealed["admin_key"]["value"] == "lf-admin-secret"
    table = runner.invoke(app, ["config"])
    assert table.exit_code == 0 and "LORAFLEET_DB_URL" in table.output and "postgresql" in table.output


def test_commands_read_the_base_from_the_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    monkeypatch.setenv("LORAFLEET_BASE", "tiny")
    res = runner.invoke(app, ["base", "info", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["name"] == "tiny-llama:0"
