"""Errors raised by the registry.

Every error is a :class:`RegistryError`; each message names the thing that is wrong and
says how to fix it, so the CLI can print it as a single line without a traceback.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""


class InvalidArgumentError(RegistryError, ValueError):
    """An argument is malformed (bad cursor, bad limit, bad digest, ...)."""


class InvalidNameError(InvalidArgumentError):
    """A tenant/user/adapter segment, alias name or address does not match the naming rules."""


class InvalidProvenanceError(InvalidArgumentError):
    """A provenance record is incomplete or inconsistent (e.g. its parent does not exist)."""


class NotFoundError(RegistryError, LookupError):
    """An adapter, revision or alias does not exist."""


class AlreadyExistsError(RegistryError):
    """An adapter with that reference already exists."""


class KeyConflictError(RegistryError):
    """A commit key (an upload's Idempotency-Key) was already used for another adapter or other content."""


class BaseMismatchError(RegistryError):
    """A revision was trained for a different base model than the one it is loaded onto."""


class CorruptBlobError(RegistryError):
    """A blob's bytes no longer hash to its digest (bit rot, truncation, tampering)."""


class MissingBlobError(RegistryError):
    """A blob referenced by a revision is absent from the blob store."""


class StorageFullError(RegistryError):
    """The blob store or the metadata database ran out of space; nothing was made visible."""


class BusyError(RegistryError):
    """The metadata database stayed locked by other writers for longer than the busy timeout."""
