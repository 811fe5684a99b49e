"""A real lorafleet server on loopback (uvicorn in a thread) over a tmp registry and the tiny base."""

from __future__ import annotations

import httpx
import pytest

from lorafleet.api.service import Limits, Service
from lorafleet.base import load_base
from lorafleet.registry import Registry
from lorafleet.serving.engine import Engine
from lorafleet.serving.params import EngineConfig
from lorafleet.serving.sources import registry_fetch
from lorafleet.testing.harness import LoopbackServer, commit_live

# A real uvicorn server on loopback: the one the dashboard tests and benchmarks use too.
Server = LoopbackServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    reg = Registry(f"sqlite:///{tmp / 'reg.db'}", str(tmp / "blobs"))
    base = load_base("tiny")
    engine = Engine(base, registry_fetch(reg), EngineConfig(max_batch=8, max_active=4, max_cached=8, max_rank=16))
    service = Service(reg, base, engine, limits=Limits(max_upload_bytes=2 * 1024 * 1024))
    _, admin = service.keys.create(admin=True, name="test-admin")
    _, key_a = service.keys.create(tenant="acme", name="acme")
    _, key_b = service.keys.create(tenant="globex", name="globex")
    digests = {
        "acme/alice/style": commit_live(reg, base, "acme/alice/style", 1),
        "acme/bob/style": commit_live(reg, base, "acme/bob/style", 2, rank=8),
        "globex/gina/style": commit_live(reg, base, "globex/gina/style", 3),
    }
    with Server(service) as srv:
        srv.keys = {"admin": admin, "acme": key_a, "globex": key_b}
        srv.digests = digests
        srv.registry, srv.base, srv.engine = reg, base, engine
        yield srv
    reg.close()


@pytest.fixture()
def admin_client(server):
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {server.keys['admin']}"},
                      timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def make_live():
    """``make_live(registry, base, ref, seed)``: commit a strong random adapter and point ``live`` at it."""
    return commit_live
