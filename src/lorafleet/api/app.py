"""The FastAPI application: OpenAI-compatible routes, the management API, health and metrics."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from lorafleet import __version__
from lorafleet.api import errors, feedback, management, openai_routes, tinker, ui
from lorafleet.api.metrics import render
from lorafleet.api.service import Service


def create_app(service: Service, *, manage_lifecycle: bool = True) -> FastAPI:
    """The app for ``service``. With ``manage_lifecycle`` the engine and worker start and stop with the app."""
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if manage_lifecycle:
            service.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                service.stop()

    app = FastAPI(title="lorafleet", version=__version__, lifespan=lifespan,
                  description="Personal models at scale: OpenAI-compatible inference per user, and the management "
                              "API for adapters, revisions, aliases, training jobs and residency.")
    app.state.service = service
    errors.install(app)
    app.include_router(management.router)
    app.include_router(feedback.router)
    app.include_router(tinker.router)
    app.include_router(openai_routes.router)

    @app.middleware("http")
    async def limits_and_counts(request: Request, call_next):
        declared = request.headers.get("content-length")
        uploading = request.method == "POST" and request.url.path.endswith("/revisions")
        limit = service.limits.max_upload_bytes if uploading else service.limits.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = JSONResponse(errors.error_body(f"request body over the limit of {limit} bytes",
                                                      "invalid_request_error", "too_large"), status_code=413)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        service.requests.add(getattr(route, "path", "unmatched"), response.status_code)
        return response

    @app.get("/health", tags=["health"], summary="Liveness and the base being served")
    def health() -> dict:
        return {"status": "ok", "version": __version__, "base": service.base.name,
                "base_fingerprint": service.base.fingerprint, "engine": service.engine is not None}

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(render(service), media_type="text/plain; version=0.0.4")


    ui.mount(app)  # the dashboard at /ui, after every API route (its file route takes the rest of /ui/)
    return app
