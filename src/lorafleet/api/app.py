"""The FastAPI application: OpenAI-compatible routes, the management API, health and metrics."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from lorafleet import __version__
from lorafleet.api import errors, feedback, management, openai_routes, tinker, ui, vllm_routes
from lorafleet.api.auth import admin_key, current_key
from lorafleet.api.body_limit import BodyLimitMiddleware
from lorafleet.api.metrics import render
from lorafleet.api.service import Service


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    base: str
    base_fingerprint: str
    engine: bool


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

    app = FastAPI(title="lorafleet", version=__version__, lifespan=lifespan, responses=errors.ERROR_RESPONSES,
                  description="Personal models at scale: OpenAI-compatible inference per user, and the management "
                              "API for adapters, revisions, aliases, training jobs and residency.")
    app.state.service = service
    errors.install(app)
    app.include_router(management.router)
    app.include_router(feedback.router)
    app.include_router(tinker.router)
    app.include_router(vllm_routes.router)
    app.include_router(openai_routes.router)

    # Bodies are counted as they arrive (chunked too) and refused at the limit; requests are counted per route.
    app.add_middleware(BodyLimitMiddleware, service=service)

    @app.get("/health", tags=["health"], summary="Liveness and the base being served",
             responses={200: {"model": Health, "description": "OK"}})
    def health() -> dict:
        return {"status": "ok", "version": __version__, "base": service.base.name,
                "base_fingerprint": service.base.fingerprint, "engine": service.engine is not None}

    def metrics_access(request: Request) -> None:
        """An admin key, unless the server was started with ``--metrics-public``."""
        if not service.metrics_public:
            admin_key(current_key(request))

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (admin key, unless --metrics-public)",
             response_class=PlainTextResponse, dependencies=[Depends(metrics_access)])
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(render(service), media_type="text/plain; version=0.0.4")


    ui.mount(app)  # the dashboard at /ui, after every API route (its file route takes the rest of /ui/)
    return app
