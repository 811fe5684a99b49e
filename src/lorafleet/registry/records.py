"""Plain, frozen records the registry hands out: provenance, adapter/revision info, audit entries."""

from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lorafleet import __version__

from .errors import InvalidProvenanceError


@functools.cache
def default_code_version() -> str:
    """``lorafleet.__version__`` plus the short git sha of the source checkout when there is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return __version__
    sha = out.stdout.strip()
    return f"{__version__}+g{sha}" if out.returncode == 0 and sha else __version__


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_dt(value: Any, field_name: str) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError as exc:
            raise InvalidProvenanceError(f"provenance field {field_name!r}: {value!r} is not an ISO-8601 time") from exc
    raise InvalidProvenanceError(f"provenance field {field_name!r}: expected an ISO-8601 string or datetime")


def _json_map(value: Any, field_name: str) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidProvenanceError(f"provenance field {field_name!r} must be a dict with string keys")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidProvenanceError(
            f"provenance field {field_name!r} must be JSON-serializable (no NaN/Inf, plain types): {exc}"
        ) from exc
    return value


@dataclass(frozen=True)
class Provenance:
    """Where a revision came from. Everything but ``metrics`` is immutable once committed."""

    base_fingerprint: str
    """Fingerprint of the base model the adapter was trained for; loading onto another base is refused."""
    parent: int | None = None
    """Revision number (same adapter) this one was trained from, if any."""
    parent_digest: str | None = None
    """Digest of the parent's blob; filled in by ``commit`` from ``parent`` when omitted."""
    method: str = "unknown"
    """Training method, e.g. ``sft``, ``dpo``, ``import``."""
    hyperparams: dict = field(default_factory=dict)
    """Training hyperparameters (JSON-serializable)."""
    dataset_digest: str | None = None
    """Digest of the training data set, if known."""
    example_count: int | None = None
    """Number of training examples seen."""
    code_version: str = field(default_factory=default_code_version)
    """lorafleet version (+ git sha) that produced the revision."""
    creator: str = ""
    """Who produced it; ``commit`` fills in its ``creator`` argument when empty."""
    created_at: datetime | None = None
    """When it was produced; ``commit`` fills in the commit time when empty."""
    metrics: dict = field(default_factory=dict)
    """Evaluation metrics; the only part of a revision that may change later (``update_metrics``)."""

    def validate(self) -> Provenance:
        """Raise :class:`InvalidProvenanceError` naming the first bad field; return self."""
        if not isinstance(self.base_fingerprint, str) or not self.base_fingerprint.strip():
            raise InvalidProvenanceError(
                "provenance field 'base_fingerprint' is required: pass the fingerprint of the base the adapter was "
                "trained on (see lorafleet.base)"
            )
        if len(self.base_fingerprint) > 255:
            raise InvalidProvenanceError("provenance field 'base_fingerprint' is longer than 255 characters")
        if self.parent is not None and (not isinstance(self.parent, int) or isinstance(self.parent, bool)
                                        or self.parent < 1):
            raise InvalidProvenanceError(f"provenance field 'parent' must be a revision number >= 1, got {self.parent!r}")
        for name in ("method", "code_version", "creator"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > 255:
                raise InvalidProvenanceError(f"provenance field {name!r} must be a string of at most 255 characters")
        for name in ("parent_digest", "dataset_digest"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or len(value) > 128):
                raise InvalidProvenanceError(f"provenance field {name!r} must be a string of at most 128 characters")
        if self.example_count is not None and (not isinstance(self.example_count, int) or self.example_count < 0):
            raise InvalidProvenanceError(
                f"provenance field 'example_count' must be a non-negative integer, got {self.example_count!r}"
            )
        if self.created_at is not None and not isinstance(self.created_at, datetime):
            raise InvalidProvenanceError("provenance field 'created_at' must be a datetime")
        _json_map(self.hyperparams, "hyperparams")
        _json_map(self.metrics, "metrics")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (times as ISO-8601 strings)."""
        out = asdict(self)
        out["created_at"] = _iso(self.created_at)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they are usually typos)."""
        if not isinstance(data, dict):
            raise InvalidProvenanceError(f"provenance must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidProvenanceError(f"unknown provenance field(s) {unknown}; known fields are {sorted(known)}")
        kwargs = dict(data)
        if "created_at" in kwargs:
            kwargs["created_at"] = _parse_dt(kwargs["created_at"], "created_at")
        if "base_fingerprint" not in kwargs:
            raise InvalidProvenanceError("provenance field 'base_fingerprint' is required")
        return cls(**kwargs)


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter identity: ``tenant/user/name`` plus its aliases and latest revision number."""

    tenant: str
    user: str
    name: str
    ref: str
    created_at: datetime
    creator: str
    description: str
    aliases: dict[str, int]
    latest: int | None
    parent: str | None = None
    """The adapter's parent in a stack (``tenant/user/adapter``), if it has one."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["created_at"] = _iso(self.created_at)
        return out


@dataclass(frozen=True)
class RevisionInfo:
    """One immutable revision of an adapter."""

    ref: str
    number: int
    digest: str
    size: int
    provenance: Provenance
    aliases: list[str]
    created_at: datetime

    @property
    def address(self) -> str:
        return f"{self.ref}#{self.number}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "number": self.number,
            "address": self.address,
            "digest": self.digest,
            "size": self.size,
            "aliases": list(self.aliases),
            "created_at": _iso(self.created_at),
            "provenance": self.provenance.to_dict(),
        }


@dataclass(frozen=True)
class AuditEntry:
    """One append-only audit record: an alias move/delete, a rollback, or a revision removed by gc."""

    id: int
    ref: str
    action: str
    alias: str | None
    from_number: int | None
    to_number: int | None
    actor: str
    reason: str
    at: datetime

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["at"] = _iso(self.at)
        return out


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` removed (or, with ``dry_run``, would remove)."""

    dry_run: bool
    keep_last: int
    deleted_revisions: list[str]
    deleted_blobs: list[str]
    freed_bytes: int
    kept_revisions: int
    removed_temp_files: int = 0
    kept_young_blobs: int = 0
    """Unreferenced blobs kept because they are younger than the grace period."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def utcnow() -> datetime:
    return datetime.now(UTC)
