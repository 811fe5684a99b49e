"""The fleet dashboard: a small web app served at ``/ui`` by ``lorafleet serve``.

The page itself (``static/``: plain HTML, CSS and ES modules, no build step, nothing fetched from another
host) is public; every piece of data it shows comes from JSON routes that need an admin key, which the
page keeps in ``sessionStorage`` and sends as ``Authorization: Bearer``. See docs/dashboard.md.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from lorafleet.api.ui.fleet import FleetStats
from lorafleet.api.ui.routes import Throughput, router

STATIC = Path(__file__).resolve().parent / "static"
# The page loads only its own files and talks only to this server.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class _Static(StaticFiles):
    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers["content-security-policy"] = CSP
        response.headers["x-content-type-options"] = "nosniff"
        response.headers["cache-control"] = "no-cache"  # revalidate: a server upgrade shows the new page at once
        return response


def mount(app: FastAPI) -> None:
    """Add the dashboard's JSON routes and its static files to ``app`` (call after the API routers)."""
    service = app.state.service
    app.state.ui_stats = FleetStats(service.registry.engine)
    app.state.ui_throughput = Throughput()
    app.include_router(router)

    @app.get("/ui", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    app.mount("/ui", _Static(directory=STATIC, html=True), name="ui")
