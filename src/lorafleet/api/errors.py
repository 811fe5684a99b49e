"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` for every route.

User errors carry their status (lorafleet.errors.LorafleetError), so a route never formats an error itself.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.errors import LorafleetError

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
    """(status, type, code): a user error carries its own (:class:`lorafleet.errors.LorafleetError`); else a bug."""
    if isinstance(exc, LorafleetError):
        return exc.http_status, exc.error_type, exc.code
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

    # User errors are expected outcomes (4xx mostly): handled inside the app, never re-raised.
    app.add_exception_handler(LorafleetError, _library)
    # Anything else is a bug: a 500 in OpenAI's shape (Starlette also logs it).
    app.add_exception_handler(Exception, _library)
