"""A Tinker-compatible training and sampling service: the official ``tinker`` SDK trains personal adapters here.

See docs/tinker.md. ``routes.router`` is mounted by :func:`lorafleet.api.app.create_app`.
"""

from lorafleet.api.tinker.core import TinkerConfig, TinkerService
from lorafleet.api.tinker.routes import router

__all__ = ["TinkerConfig", "TinkerService", "router"]
