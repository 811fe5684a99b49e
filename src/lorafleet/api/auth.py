"""Authentication: ``Authorization: Bearer <key>``. Tenant keys reach their tenant's adapters only."""

from __future__ import annotations

from fastapi import Depends, Request

from lorafleet.api.errors import ApiError
from lorafleet.api.keys import ApiKey


def _secret(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", type_="authentication_error",
                       code="missing_api_key")
    return token.strip()


def current_key(request: Request) -> ApiKey:
    key = request.app.state.service.keys.verify(_secret(request))
    if key is None:
        raise ApiError(401, "invalid or revoked API key", type_="authentication_error", code="invalid_api_key")
    return key


def admin_key(key: ApiKey = Depends(current_key)) -> ApiKey:
    if not key.is_admin:
        raise ApiError(403, "this route needs an admin key", type_="permission_error", code="admin_required")
    return key


def can_use(key: ApiKey, tenant: str) -> bool:
    """Whether ``key`` may use adapters of ``tenant`` (an admin may use every tenant's)."""
    return key.is_admin or key.tenant == tenant
