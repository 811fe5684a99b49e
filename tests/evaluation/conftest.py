"""Fixtures: a throwaway SQLite registry and the tiny base."""

from __future__ import annotations

import pytest

from lorafleet.registry import Registry


@pytest.fixture
def registry(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}", str(tmp_path / "blobs"))
    yield reg
    reg.close()


@pytest.fixture(scope="session")
def tiny_base():
    from lorafleet.base import load_base

    return load_base("tiny")


@pytest.fixture(autouse=True)
def _fresh_base_cache():
    from lorafleet.evaluation import metrics

    metrics.clear_base_cache()
    yield
