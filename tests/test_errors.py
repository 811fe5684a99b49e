"""One base class of user errors: every room's user-error class derives from it, and both the HTTP API and the
CLI show every one of them the same way (its status / exit code, its message) — never a 500 or a traceback."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import typer
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import lorafleet
from lorafleet.api import errors as api_errors
from lorafleet.cli.common import handle_errors
from lorafleet.errors import LorafleetError, user_error_classes

OPTIONAL = ("lorafleet.cluster.ray_app", "lorafleet.adapters.triton_lora")  # need ray / triton installed


def _import_everything() -> None:
    for mod in pkgutil.walk_packages(lorafleet.__path__, "lorafleet."):
        if ".migrations" in mod.name or mod.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(mod.name)
        except ImportError:
            if mod.name not in OPTIONAL:
                raise


_import_everything()
CLASSES = user_error_classes()


def test_the_rooms_user_errors_are_lorafleet_errors():
    from lorafleet.adapters.errors import AdapterError
    from lorafleet.api.keys import ApiKeyError
    from lorafleet.base.sources import BaseSourceError
    from lorafleet.cluster.config import ClusterConfigError
    from lorafleet.continual.schedule import PolicyError
    from lorafleet.evaluation.errors import EvaluationError
    from lorafleet.registry.errors import RegistryError
    from lorafleet.registry.stacks import StackError
    from lorafleet.training.data import DataError
    from lorafleet.training.jobs import JobError
    from lorafleet.training.trainer import TrainConfigError

    for cls in (AdapterError, ApiKeyError, BaseSourceError, ClusterConfigError, PolicyError, EvaluationError,
                RegistryError, StackError, DataError, JobError, TrainConfigError):
        assert cls in CLASSES, cls
    assert len(CLASSES) >= 20


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_user_error_maps_in_the_api_and_the_cli(cls):
    assert 400 <= cls.http_status < 600 and cls.exit_code == 2 and cls.code and cls.error_type

    app = FastAPI()
    api_errors.install(app)

    @app.get("/boom")
    def boom():
        raise cls(f"{cls.__name__} says what is wrong")

    res = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert res.status_code == cls.http_status
    error = res.json()["error"]
    assert (error["type"], error["code"]) == (cls.error_type, cls.code)
    if cls.http_status < 500:
        assert error["message"] == f"{cls.__name__} says what is wrong"

    cli = typer.Typer()

    @cli.command()
    @handle_errors
    def run() -> None:
        raise cls(f"{cls.__name__} [says] what is wrong")

    out = CliRunner().invoke(cli, [])
    assert out.exit_code == cls.exit_code
    assert out.output.strip() == f"error: {cls.__name__} [says] what is wrong"


def test_a_bug_is_a_500_without_its_message():
    app = FastAPI()
    api_errors.install(app)

    @app.get("/bug")
    def bug():
        raise KeyError("internal detail")

    res = TestClient(app, raise_server_exceptions=False).get("/bug")
    assert res.status_code == 500 and "internal detail" not in res.text
    assert not issubclass(KeyError, LorafleetError)
