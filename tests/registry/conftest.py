"""Fixtures for the registry tests."""

from __future__ import annotations

import os

import pytest

from lorafleet.registry import Registry
from lorafleet.testing.pgtest import free_port


@pytest.fixture
def blob_url(tmp_path):
    return str(tmp_path / "blobs")


@pytest.fixture
def registry(registry_url, blob_url):
    reg = Registry(registry_url, blob_url)
    yield reg
    reg.close()


@pytest.fixture
def sqlite_registry(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}", str(tmp_path / "blobs"))
    yield reg
    reg.close()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 in server mode on a free loopback port, for the s3fs blob store."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials + endpoint for s3fs pointing at moto; returns the endpoint URL."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "LORAFLEET_S3_ENDPOINT": s3_server,
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        if key in os.environ:
            monkeypatch.delenv(key)
    return s3_server


@pytest.fixture
def cli_home(tmp_path, monkeypatch):
    """An embedded registry under tmp_path for CLI tests: no DB/blob URLs from the environment, the tiny base,
    wide tables (rich sizes them to the terminal)."""
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAFLEET_DB_URL", raising=False)
    monkeypatch.delenv("LORAFLEET_BLOB_URL", raising=False)
    monkeypatch.setenv("LORAFLEET_BASE", "tiny")
    monkeypatch.setenv("COLUMNS", "240")
    return tmp_path
