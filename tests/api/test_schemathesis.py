"""schemathesis against the app's own OpenAPI schema (in process, ASGI).

Every generated request — schema-fitting and schema-violating — must get no 5xx, a documented status code and
content type, and a body that fits the documented schema: every error is the OpenAI-shaped ``ErrorBody``, the
Tinker routes' answers their documented models. A dozen examples per route in the quick suite; 200 per route,
the Tinker routes included, under ``@pytest.mark.slow``.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import checks as generic
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi import checks as openapi

from lorafleet.api.app import create_app
from lorafleet.api.service import Limits, Service
from lorafleet.api.tinker import TinkerConfig, TinkerService
from lorafleet.base import load_base
from lorafleet.registry import Registry
from lorafleet.serving.engine import Engine
from lorafleet.serving.params import EngineConfig
from lorafleet.serving.sources import registry_fetch

ADMIN = {}
CHECKS = [generic.not_a_server_error, openapi.status_code_conformance, openapi.content_type_conformance,
          openapi.response_schema_conformance]
# forward_backward's body is protobuf: generated as opaque bytes (the route must refuse them with a 400).
schemathesis.serializer.alias("application/x-protobuf", "application/octet-stream")


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
    app.state.tinker = TinkerService(service, TinkerConfig(long_poll_s=0.5, gap_wait_s=0.5), home=tmp / "tinker")
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    app.state.tinker.stop()
    reg.close()


def run_all(api_schema, examples: int) -> tuple[list[str], list[str]]:
    failures, operations = [], []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations.append(operation.label)
        cases = st.one_of(operation.as_strategy(), operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(headers={"authorization": f"Bearer {ADMIN['key']}"})
            try:
                case.validate_response(response, checks=CHECKS)
            except (Failure, FailureGroup) as exc:  # one failure or a group: kept, to report them all
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {str(exc)[:600]}")

        check()
    return failures, operations


def test_no_server_errors_and_documented_answers(api_schema):
    """Every operation, a dozen generated requests each (admin key, so the routes run, not just auth)."""
    failures, operations = run_all(api_schema, 12)
    assert len(operations) >= 50
    assert not failures, "\n".join(failures[:10])


@pytest.mark.slow
def test_two_hundred_examples_per_route_tinker_included(api_schema):
    failures, operations = run_all(api_schema, 200)
    tinker = [o for o in operations if o.split(" ")[1].startswith("/api/v1/")]
    assert len(tinker) >= 15, tinker  # the Tinker routes are in the schema, with their request bodies
    assert not failures, "\n".join(failures[:10])
