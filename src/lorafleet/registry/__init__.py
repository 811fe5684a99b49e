"""The adapter registry: identity -> immutable, content-addressed revisions -> blobs.

>>> from lorafleet.registry import Registry, Provenance
>>> reg = Registry()                                   # sqlite + files under $LORAFLEET_HOME
>>> rev = reg.commit("acme/alice/assistant", blob, Provenance(base_fingerprint=fp))
>>> reg.set_alias("acme/alice/assistant", "live", rev.number, reason="gate passed")
>>> info, data = reg.load("acme/alice/assistant", base_fingerprint=fp)

See docs/registry.md for addressing, aliases, provenance, retention and backends.
"""

from .errors import (
    AlreadyExistsError,
    BaseMismatchError,
    BusyError,
    CorruptBlobError,
    InvalidArgumentError,
    InvalidNameError,
    InvalidProvenanceError,
    KeyConflictError,
    MissingBlobError,
    NotFoundError,
    RegistryError,
    StorageFullError,
)
from .names import Address, parse_address, parse_ref
from .records import AdapterInfo, AuditEntry, GcReport, Provenance, RevisionInfo
from .registry import Registry

__all__ = [
    "Address",
    "AdapterInfo",
    "AlreadyExistsError",
    "AuditEntry",
    "BaseMismatchError",
    "BusyError",
    "CorruptBlobError",
    "GcReport",
    "InvalidArgumentError",
    "InvalidNameError",
    "InvalidProvenanceError",
    "KeyConflictError",
    "MissingBlobError",
    "NotFoundError",
    "Provenance",
    "Registry",
    "RegistryError",
    "RevisionInfo",
    "StorageFullError",
    "parse_address",
    "parse_ref",
]
