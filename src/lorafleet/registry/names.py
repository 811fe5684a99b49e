"""Naming rules and address parsing.

An adapter is identified by a *ref* ``tenant/user/adapter``. A revision is addressed by

* ``tenant/user/adapter``          — the revision the ``live`` alias points at,
* ``tenant/user/adapter@alias``    — the revision an alias points at,
* ``tenant/user/adapter#N``        — revision number ``N`` (1, 2, 3, ...).

Segments are lowercase so that two refs never differ only by case (file systems, URLs and
humans disagree about case). A leading ``_`` is allowed for special users such as ``_org``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorafleet import digest

from .errors import InvalidNameError

SEGMENT_RE = re.compile(r"^[a-z0-9_][a-z0-9_.-]{0,62}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

SEGMENT_RULE = "1-63 characters of a-z, 0-9, '_', '.', '-', starting with a letter, digit or '_'"
ALIAS_RULE = "1-32 characters of a-z, 0-9, '_', '-', starting with a letter"

LIVE = "live"
CANDIDATE = "candidate"


@dataclass(frozen=True)
class Address:
    """A parsed address: exactly one of ``alias`` / ``number`` is set."""

    tenant: str
    user: str
    name: str
    alias: str | None = None
    number: int | None = None

    @property
    def ref(self) -> str:
        return f"{self.tenant}/{self.user}/{self.name}"

    def __str__(self) -> str:
        if self.number is not None:
            return f"{self.ref}#{self.number}"
        return f"{self.ref}@{self.alias}"


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else f"{value!r} (a {type(value).__name__})"


def check_segment(value: object, what: str, ref: object = None) -> str:
    """Return ``value`` if it is a valid ``what`` segment (tenant/user/adapter), else raise."""
    where = f" in {ref!r}" if ref is not None else ""
    if not isinstance(value, str) or not SEGMENT_RE.fullmatch(value):
        raise InvalidNameError(f"invalid {what} segment {_show(value)}{where}: use {SEGMENT_RULE}")
    return value


def check_alias(value: object) -> str:
    """Return ``value`` if it is a valid alias name, else raise :class:`InvalidNameError`."""
    if not isinstance(value, str) or not ALIAS_RE.fullmatch(value):
        raise InvalidNameError(f"invalid alias name {_show(value)}: use {ALIAS_RULE}")
    return value


def check_digest(value: object) -> str:
    """Return ``value`` if it is a lowercase hex sha256 digest, else raise."""
    return digest.check_digest(value, InvalidNameError, "blob digest")


def parse_ref(ref: object) -> tuple[str, str, str]:
    """Split and validate ``tenant/user/adapter``."""
    if not isinstance(ref, str):
        raise InvalidNameError(f"invalid adapter ref {_show(ref)}: expected a string 'tenant/user/adapter'")
    parts = ref.split("/")
    if len(parts) != 3:
        raise InvalidNameError(
            f"invalid adapter ref {ref!r}: expected exactly three segments 'tenant/user/adapter', got {len(parts)}"
        )
    for part, what in zip(parts, ("tenant", "user", "adapter"), strict=True):
        check_segment(part, what, ref)
    return parts[0], parts[1], parts[2]


def parse_address(address: object) -> Address:
    """Parse ``t/u/a`` (= ``@live``), ``t/u/a@alias`` or ``t/u/a#N``."""
    if not isinstance(address, str):
        raise InvalidNameError(f"invalid address {_show(address)}: expected 't/u/a', 't/u/a@alias' or 't/u/a#N'")
    if "@" in address and "#" in address:
        raise InvalidNameError(f"invalid address {address!r}: use either '@alias' or '#N', not both")
    if "#" in address:
        ref, _, num = address.partition("#")
        if not num.isascii() or not num.isdigit() or num.startswith("0") or len(num) > 18:
            raise InvalidNameError(
                f"invalid revision number {num!r} in {address!r}: expected a positive integer like 't/u/a#3'"
            )
        tenant, user, name = parse_ref(ref)
        return Address(tenant, user, name, number=int(num))
    if "@" in address:
        ref, _, alias = address.partition("@")
        tenant, user, name = parse_ref(ref)
        return Address(tenant, user, name, alias=check_alias(alias))
    tenant, user, name = parse_ref(address)
    return Address(tenant, user, name, alias=LIVE)
