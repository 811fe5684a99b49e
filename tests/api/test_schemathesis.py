"""schemathesis against the app's own OpenAPI schema (in process, ASGI): no generated input gives a 5xx."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from lorafleet.api.app import create_app
from lorafleet.api.service import Limits, Service
from lorafleet.base import load_base
from lorafleet.registry import Registry
from lorafleet.serving.engine import Engine
from lorafleet.serving.params import EngineConfig
from lorafleet.serving.sources import registry_fetch

ADMIN = {}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, make_live):
    tmp = tmp_path_factory.mktemp("schema")
    reg = Registry(f"sqlite:///{tmp / 'reg.db'}", str(tmp / "blobs"))
    base = load_base("tiny")
    engine = Engine(base, registry_fetch(reg), EngineConfig(max_batch=4, max_active=2, max_cached=4))
    service = Service(reg, base, engine, limits=Limits(max_upload_bytes=256 * 1024, max_tokens=16))
    _, ADMIN["key"] = service.keys.create(admin=True)
    make_live(reg, base, "acme/alice/style", 1)
    app = create_app(service, manage_lifecycle=False)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_server_errors(api_schema):
    """Every operation, a dozen generated requests each (admin key, so the routes run, not just auth)."""
    failures, operations = [], 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(headers={"authorization": f"Bearer {ADMIN['key']}"})
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")

        check()
    assert operations >= 20
    assert not failures, "\n".join(failures[:10])
