"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` for every route.

Library errors map to status codes in one table, so a route never formats an error itself.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.registry import errors as reg
from lorafleet.registry.errors import RegistryError
from lorafleet.training.data import DataError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with an HTTP status, raised by routes."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _status_for(exc: Exception) -> tuple[int, str, str]:
    """(status, type, code) for library exceptions; the first matching class wins."""
    from lorafleet.adapters.errors import AdapterError  # noqa: PLC0415 - defers torch
    from lorafleet.training.trainer import TrainConfigError  # noqa: PLC0415 - defers torch

    table = [
        (reg.NotFoundError, 404, "not_found_error", "not_found"),
        (reg.AlreadyExistsError, 409, "conflict_error", "already_exists"),
        (reg.BaseMismatchError, 422, "invalid_request_error", "base_mismatch"),
        (reg.StorageFullError, 507, "server_error", "storage_full"),
        (reg.BusyError, 503, "server_error", "busy"),
        (reg.CorruptBlobError, 500, "server_error", "corrupt_blob"),
        (reg.MissingBlobError, 500, "server_error", "missing_blob"),
        (AdapterError, 422, "invalid_request_error", "invalid_adapter"),
        (DataError, 422, "invalid_request_error", "invalid_data"),
        (TrainConfigError, 422, "invalid_request_error", "invalid_config"),
        (reg.RegistryError, 400, "invalid_request_error", "invalid_request"),
    ]
    for cls, status, type_, code in table:
        if isinstance(exc, cls):
            return status, type_, code
    return 500, "server_error", "internal_error"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", where or None),
                            status_code=400)

    async def _library(_: Request, exc: Exception):
        status, type_, code = _status_for(exc)
        if status >= 500:
            log.error("request failed: %s", exc, exc_info=exc)
        message = str(exc) if status < 500 or code != "internal_error" else "internal server error"
        return JSONResponse(error_body(message, type_, code), status_code=status)

    from lorafleet.adapters.errors import AdapterError  # noqa: PLC0415 - defers torch
    from lorafleet.training.trainer import TrainConfigError  # noqa: PLC0415 - defers torch

    # Library errors are expected outcomes (4xx mostly): handled inside the app, never re-raised.
    for cls in (RegistryError, AdapterError, DataError, TrainConfigError):
        app.add_exception_handler(cls, _library)
    # Anything else is a bug: a 500 in OpenAI's shape (Starlette also logs it).
    app.add_exception_handler(Exception, _library)
