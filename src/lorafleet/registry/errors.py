"""Errors raised by the registry.

Every error is a :class:`RegistryError`; each message names the thing that is wrong and
says how to fix it, so the CLI can print it as a single line without a traceback.
"""

from __future__ import annotations

from lorafleet.errors import LorafleetError


class RegistryError(LorafleetError):
    """Base class of every error the registry raises on purpose (400 unless a subclass says otherwise)."""


class InvalidArgumentError(RegistryError, ValueError):
    """An argument is malformed (bad cursor, bad limit, bad digest, ...)."""


class InvalidNameError(InvalidArgumentError):
    """A tenant/user/adapter segment, alias name or address does not match the naming rules."""


class InvalidProvenanceError(InvalidArgumentError):
    """A provenance record is incomplete or inconsistent (e.g. its parent does not exist)."""


class NotFoundError(RegistryError, LookupError):
    """An adapter, revision or alias does not exist."""

    http_status, error_type, code = 404, "not_found_error", "not_found"


class AlreadyExistsError(RegistryError):
    """An adapter with that reference already exists."""

    http_status, error_type, code = 409, "conflict_error", "already_exists"


class KeyConflictError(RegistryError):
    """A commit key (an upload's Idempotency-Key) was already used for another adapter or other content."""

    http_status, error_type, code = 409, "conflict_error", "idempotency_key_reused"


class BaseMismatchError(RegistryError):
    """A revision was trained for a different base model than the one it is loaded onto."""

    http_status, code = 422, "base_mismatch"


class CorruptBlobError(RegistryError):
    """A blob's bytes no longer hash to its digest (bit rot, truncation, tampering)."""

    http_status, error_type, code = 500, "server_error", "corrupt_blob"


class MissingBlobError(RegistryError):
    """A blob referenced by a revision is absent from the blob store."""

    http_status, error_type, code = 500, "server_error", "missing_blob"


class StorageFullError(RegistryError):
    """The blob store or the metadata database ran out of space; nothing was made visible."""

    http_status, error_type, code = 507, "server_error", "storage_full"


class BusyError(RegistryError):
    """The metadata database stayed locked by other writers for longer than the busy timeout."""

    http_status, error_type, code = 503, "server_error", "busy"
