"""The content digest: sha256 hex of an object's canonical bytes, its one name everywhere.

The registry stores blobs under it, the engine fetches and verifies adapters by it, the cluster routes by it.
It imports nothing of lorafleet, so every room can use it.
"""

from __future__ import annotations

import hashlib
import re

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
DIGEST_RULE = "64 lowercase hex characters (sha256)"


def digest_of(data: bytes | bytearray | memoryview) -> str:
    """The content digest of ``data``: sha256 hex."""
    return hashlib.sha256(data).hexdigest()


def is_digest(value: object) -> bool:
    return isinstance(value, str) and DIGEST_RE.fullmatch(value) is not None


def check_digest(value: object, error: type[Exception] = ValueError, what: str = "digest") -> str:
    """``value`` if it is a digest, else raise ``error`` (each room passes its own user-error class)."""
    if not is_digest(value):
        shown = repr(value) if isinstance(value, str) else f"{value!r} (a {type(value).__name__})"
        raise error(f"invalid {what} {shown}: expected {DIGEST_RULE}")
    return value
