"""API keys: a tenant key addresses only its tenant's adapters; an admin key manages everything.

Keys are random 32-byte secrets shown once at creation (``lf-<tenant-or-admin>-<secret>``); only their
sha256 is stored (a high-entropy secret needs no slow password hash). Verification is one indexed lookup.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from lorafleet.registry import NotFoundError, Registry, RegistryError
from lorafleet.registry import db as regdb
from lorafleet.registry.names import check_segment
from lorafleet.registry.schema import api_keys

ROLES = ("tenant", "admin")


class ApiKeyError(RegistryError):
    """A key request is invalid."""


@dataclass(frozen=True)
class ApiKey:
    id: int
    prefix: str
    tenant: str | None
    role: str
    name: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def to_dict(self) -> dict:
        return {"id": self.id, "prefix": self.prefix, "tenant": self.tenant, "role": self.role, "name": self.name,
                "created_at": self.created_at.isoformat(),
                "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None}


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _row(r) -> ApiKey:
    return ApiKey(r.id, r.prefix, r.tenant, r.role, r.name, r.created_at, r.revoked_at)


class KeyStore:
    def __init__(self, registry: Registry) -> None:
        self.engine = registry.engine

    def create(self, *, tenant: str | None = None, admin: bool = False, name: str = "") -> tuple[ApiKey, str]:
        """Create a key; returns its record and the secret (shown once, never stored)."""
        if admin == (tenant is not None):
            raise ApiKeyError("a key is either for one tenant (--tenant NAME) or an admin key (--admin), not both")
        if tenant is not None:
            check_segment(tenant, "tenant")
        secret = f"lf-{tenant or 'admin'}-{secrets.token_urlsafe(32)}"
        now = datetime.now(UTC)
        with regdb.write_tx(self.engine) as conn:
            key_id = conn.execute(api_keys.insert().values(
                key_hash=_hash(secret), prefix=secret[: min(len(secret), 16)], tenant=tenant,
                role="admin" if admin else "tenant", name=name[:255], created_at=now).returning(api_keys.c.id)).scalar_one()
        return self.get(key_id), secret

    def ensure(self, secret: str, *, tenant: str | None = None, admin: bool = False, name: str = "") -> ApiKey:
        """Register a secret chosen by the operator (e.g. from an environment variable), if not yet known."""
        if len(secret) < 16:
            raise ApiKeyError("a key secret must have at least 16 characters")
        found = self.verify(secret)
        if found is not None:
            return found
        if admin == (tenant is not None):
            raise ApiKeyError("a key is either for one tenant or an admin key, not both")
        with regdb.write_tx(self.engine) as conn:
            key_id = conn.execute(api_keys.insert().values(
                key_hash=_hash(secret), prefix=secret[:8], tenant=tenant, role="admin" if admin else "tenant",
                name=name[:255], created_at=datetime.now(UTC)).returning(api_keys.c.id)).scalar_one()
        return self.get(key_id)

    def get(self, key_id: int) -> ApiKey:
        with regdb.read_tx(self.engine) as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None:
            raise NotFoundError(f"API key {key_id} does not exist (see `lorafleet keys ls`)")
        return _row(row)

    def verify(self, secret: str) -> ApiKey | None:
        """The active key for ``secret``, or None (unknown or revoked)."""
        if not secret or len(secret) > 256:
            return None
        with regdb.read_tx(self.engine) as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_hash == _hash(secret),
                                                         api_keys.c.revoked_at.is_(None))).first()
        return _row(row) if row is not None else None

    def list(self, *, tenant: str | None = None, include_revoked: bool = False) -> list[ApiKey]:
        stmt = sa.select(api_keys).order_by(api_keys.c.id)
        if tenant is not None:
            stmt = stmt.where(api_keys.c.tenant == tenant)
        if not include_revoked:
            stmt = stmt.where(api_keys.c.revoked_at.is_(None))
        with regdb.read_tx(self.engine) as conn:
            return [_row(r) for r in conn.execute(stmt)]

    def revoke(self, key_id: int) -> ApiKey:
        with regdb.write_tx(self.engine) as conn:
            res = conn.execute(api_keys.update().where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                               .values(revoked_at=datetime.now(UTC)))
        if res.rowcount != 1:
            self.get(key_id)  # raises NotFoundError for an unknown id
            raise ApiKeyError(f"API key {key_id} is already revoked")
        return self.get(key_id)
