"""The fleet dashboard: a small web app served at ``/ui`` by ``lorafleet serve``.

The page itself (``static/``: plain HTML, CSS and ES modules, no build step, nothing fetched from another
host) is public; every piece of data it shows comes from JSON routes that need an admin key, which the
page keeps in ``sessionStorage`` and sends as ``Authorization: Bearer``. See docs/dashboard.md.
"""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse

from lorafleet.api.errors import ApiError
from lorafleet.api.ui.fleet import FleetStats
from lorafleet.api.ui.routes import Throughput, router

STATIC = Path(__file__).resolve().parent / "static"
# The page loads only its own files and talks only to this server.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class StaticAssets:
    """The page's files, read once into memory (a few tens of KB) and served with an ETag.

    In memory rather than from disk per request: no file-system work or thread hop on the path to first paint.
    """

    def __init__(self, root: Path = STATIC) -> None:
        self.files: dict[str, tuple[bytes, str, str]] = {}
        for path in sorted(root.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                if kind.startswith("text/") or kind.endswith("javascript"):
                    kind = f"{'text/javascript' if path.suffix == '.js' else kind}; charset=utf-8"
                etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'
                self.files[path.relative_to(root).as_posix()] = (data, kind, etag)

    def response(self, name: str, if_none_match: str | None) -> Response:
        found = self.files.get(name or "index.html")
        if found is None:
            raise ApiError(404, f"no such dashboard file: {name!r}", type_="not_found_error", code="not_found")
        data, kind, etag = found
        headers = {"etag": etag, "cache-control": "no-cache", "content-security-policy": CSP,
                   "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}
        if if_none_match == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=kind, headers=headers)


def mount(app: FastAPI) -> None:
    """Add the dashboard's JSON routes and its page to ``app`` (call after the API routers)."""
    service = app.state.service
    app.state.ui_stats = FleetStats(service.registry.engine)
    app.state.ui_throughput = Throughput()
    app.include_router(router)
    assets = StaticAssets()

    @app.get("/ui", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/ui/{name:path}", include_in_schema=False)
    async def ui_file(name: str, request: Request) -> Response:
        return assets.response(name, request.headers.get("if-none-match"))
