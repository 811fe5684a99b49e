"""Shared fixtures: a session-wide throwaway PostgreSQL server and the ``registry_url`` fixture
that runs a test once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import itertools
import os

# The Triton kernel tests (tests/adapters/triton) run in Triton's CPU interpreter. torch imports triton (through
# torch._dynamo) as soon as transformers loads, and triton's own library functions are built for the interpreter
# only if TRITON_INTERPRET=1 is set before that import: so here, before anything imports torch. No effect on CPU
# code otherwise (nothing but those kernels uses triton). TRITON_INTERPRET=0 keeps compiled kernels (a GPU run).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from lorafleet.testing import pgtest

_db_counter = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server for the whole session (skipped only when the binaries are absent)."""
    if pgtest.find_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin and $LORAFLEET_PG_BIN)")
    with pgtest.TempPostgres() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def registry_url(request, tmp_path):
    """A fresh, empty registry database URL: SQLite file in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    server = request.getfixturevalue("pg_server")
    return server.create_database(f"test_{next(_db_counter)}")
