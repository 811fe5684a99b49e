"""Request bodies counted as they arrive: over the limit → 413 before the rest is read (``Content-Length`` or
``Transfer-Encoding: chunked`` alike), on every route. Also counts requests per route and status for /metrics.

A pure ASGI middleware (not ``@app.middleware("http")``): it wraps ``receive``, so the app never holds more
than the limit of one body, and uvicorn's flow control keeps the rest of a hostile body on the client's side.
"""

from __future__ import annotations

import json

from lorafleet.api.errors import BodyTooLarge, error_body


def too_large_body(limit: int) -> bytes:
    return json.dumps(error_body(f"request body over the limit of {limit} bytes", "invalid_request_error",
                                 "too_large")).encode()


class BodyLimitMiddleware:
    """``max_upload_bytes`` for adapter uploads (``POST …/revisions``), ``max_body_bytes`` for everything else."""

    def __init__(self, app, service) -> None:
        self.app, self.service = app, service

    def limit_for(self, scope) -> int:
        limits = self.service.limits
        uploading = scope.get("method") == "POST" and scope.get("path", "").endswith("/revisions")
        return limits.max_upload_bytes if uploading else limits.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        status: list[int] = []

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await self._refuse(counted_send, limit)  # never read: the declared size alone is over
                return
            received = 0

            async def counted_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLarge(limit)
                return message

            try:
                await self.app(scope, counted_receive, counted_send)
            except BodyTooLarge:  # raised where no handler saw it (outside a route): answer here if we still can
                if not status:
                    await self._refuse(counted_send, limit)
        finally:
            route = scope.get("route")
            self.service.requests.add(getattr(route, "path", "unmatched"), status[0] if status else 500)

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        body = too_large_body(limit)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
