"""Naming rules: table-driven bad names, each rejected with a message naming the segment."""

from __future__ import annotations

import pytest

from lorafleet.registry import InvalidNameError, parse_address, parse_ref
from lorafleet.registry.names import check_alias, check_digest

BAD_REFS = [
    ("acme/alice", "exactly three segments"),
    ("acme/alice/assistant/x", "exactly three segments"),
    ("", "exactly three segments"),
    ("Acme/alice/assistant", "invalid tenant segment 'Acme'"),
    ("acme/Alice/assistant", "invalid user segment 'Alice'"),
    ("acme/alice/Assistant", "invalid adapter segment 'Assistant'"),
    ("acme//assistant", "invalid user segment ''"),
    ("./alice/assistant", r"invalid tenant segment '\.'"),
    ("acme/../assistant", r"invalid user segment '\.\.'"),
    ("acme/alice/.hidden", r"invalid adapter segment '\.hidden'"),
    ("acme/alice/-dash", "invalid adapter segment '-dash'"),
    ("acme/al ice/assistant", "invalid user segment 'al ice'"),
    ("acme/alice/a\x00b", "invalid adapter segment"),
    ("acme/alice/a\\b", "invalid adapter segment"),
    ("acme/alice/ümlaut", "invalid adapter segment"),
    ("acme/alice/" + "a" * 64, "invalid adapter segment"),
    ("acme/alice/a:b", "invalid adapter segment"),
    ("acme/alice/a\n", "invalid adapter segment"),
]


@pytest.mark.parametrize(("ref", "message"), BAD_REFS)
def test_bad_refs_are_rejected(ref, message):
    with pytest.raises(InvalidNameError, match=message):
        parse_ref(ref)


@pytest.mark.parametrize("ref", [None, 3, b"acme/alice/x"])
def test_non_string_refs_are_rejected(ref):
    with pytest.raises(InvalidNameError, match="invalid adapter ref"):
        parse_ref(ref)


@pytest.mark.parametrize(
    "ref", ["acme/alice/assistant", "_org/_shared/base-style", "t0/u.1/a_b-c", "a/b/c", "x/y/" + "z" * 63]
)
def test_good_refs(ref):
    assert "/".join(parse_ref(ref)) == ref


BAD_ADDRESSES = [
    ("acme/alice/a@", "invalid alias name ''"),
    ("acme/alice/a@Live", "invalid alias name 'Live'"),
    ("acme/alice/a@1st", "invalid alias name '1st'"),
    ("acme/alice/a@" + "x" * 33, "invalid alias name"),
    ("acme/alice/a@x@y", "invalid alias name 'x@y'"),
    ("acme/alice/a#", "invalid revision number ''"),
    ("acme/alice/a#0", "invalid revision number '0'"),
    ("acme/alice/a#-1", "invalid revision number '-1'"),
    ("acme/alice/a#01", "invalid revision number '01'"),
    ("acme/alice/a#1.5", "invalid revision number"),
    ("acme/alice/a#٣", "invalid revision number"),
    ("acme/alice/a@live#2", "either '@alias' or '#N'"),
    ("acme/ALICE/a#2", "invalid user segment 'ALICE'"),
]


@pytest.mark.parametrize(("address", "message"), BAD_ADDRESSES)
def test_bad_addresses_are_rejected(address, message):
    with pytest.raises(InvalidNameError, match=message):
        parse_address(address)


def test_address_forms():
    assert parse_address("acme/alice/a").alias == "live"
    bare = parse_address("acme/alice/a")
    assert (bare.ref, bare.number) == ("acme/alice/a", None)
    assert parse_address("acme/alice/a@candidate").alias == "candidate"
    assert parse_address("acme/alice/a#12").number == 12
    assert str(parse_address("acme/alice/a#12")) == "acme/alice/a#12"


@pytest.mark.parametrize("alias", ["", "Live", "_x", "-x", "a b", "a.b", "x" * 33, None])
def test_bad_alias_names(alias):
    with pytest.raises(InvalidNameError, match="invalid alias name"):
        check_alias(alias)


@pytest.mark.parametrize("digest", ["", "ab", "A" * 64, "g" * 64, "a" * 63, "../" + "a" * 61, None])
def test_bad_digests(digest):
    with pytest.raises(InvalidNameError, match="invalid blob digest"):
        check_digest(digest)
