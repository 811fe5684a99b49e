"""The one content digest: the registry, the engine and the cluster name a blob the same way."""

import hashlib

import pytest

from lorafleet.digest import check_digest, digest_of, is_digest
from lorafleet.registry import InvalidNameError
from lorafleet.registry.names import check_digest as registry_check_digest


def test_digest_is_sha256_hex_and_checked():
    d = digest_of(b"adapter bytes")
    assert d == hashlib.sha256(b"adapter bytes").hexdigest() and is_digest(d)
    assert check_digest(d) == d
    for bad in ("A" * 64, "0" * 63, "../etc/passwd", 42, None):
        assert not is_digest(bad)
        with pytest.raises(ValueError, match="64 lowercase hex"):
            check_digest(bad)


def test_each_room_raises_its_own_user_error():
    with pytest.raises(InvalidNameError, match="invalid blob digest 'x'"):
        registry_check_digest("x")
    assert registry_check_digest(digest_of(b"")) == digest_of(b"")
