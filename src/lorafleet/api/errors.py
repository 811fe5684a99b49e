"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` for every route.

User errors carry their status (lorafleet.errors.LorafleetError), so a route never formats an error itself.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.errors import LorafleetError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with an HTTP status, raised by routes."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """What every error answers (OpenAI's shape)."""

    error: ErrorDetail


# Documented on every route (OpenAPI): any 4xx/5xx is an ErrorBody. Also replaces FastAPI's default 422 schema,
# since request validation errors answer 400 in this shape.
ERROR_RESPONSES: dict = {"4XX": {"model": ErrorBody, "description": "a request error, in OpenAI's error shape"},
                         "5XX": {"model": ErrorBody, "description": "a server error, in OpenAI's error shape"}}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _status_for(exc: Exception) -> tuple[int, str, str]:
    """(status, type, code): a user error carries its own (:class:`lorafleet.errors.LorafleetError`); else a bug."""
    if isinstance(exc, LorafleetError):
        return exc.http_status, exc.error_type, exc.code
    return 500, "server_error", "internal_error"


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once a body passes its limit; the app's handler answers 413 (``too_large``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the limit of {limit} bytes", headers={"connection": "close"})
        self.limit = limit


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", "too_large"), status_code=413,
                            headers=exc.headers)

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
        code = "invalid_request"
        if first.get("type") == "extra_forbidden":  # a field this server does not implement: refused, never ignored
            message, code = f"{where}: this parameter is not supported by this server", "unsupported_parameter"
        return JSONResponse(error_body(message, "invalid_request_error", code, where or None), status_code=400)

    async def _library(_: Request, exc: Exception):
        status, type_, code = _status_for(exc)
        if status >= 500:
            log.error("request failed: %s", exc, exc_info=exc)
        message = str(exc) if status < 500 or code != "internal_error" else "internal server error"
        return JSONResponse(error_body(message, type_, code), status_code=status)

    # User errors are expected outcomes (4xx mostly): handled inside the app, never re-raised.
    app.add_exception_handler(LorafleetError, _library)
    # Anything else is a bug: a 500 in OpenAI's shape (Starlette also logs it).
    app.add_exception_handler(Exception, _library)
