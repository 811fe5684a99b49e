"""One engine contract: the in-process Engine and the Ray Serve RemoteEngine both meet EngineLike, and the
adapter argument has one normal form (a tuple of digests, root first; () = the base)."""

from __future__ import annotations

import inspect

import pytest

from lorafleet.cluster.remote import RemoteEngine
from lorafleet.digest import digest_of
from lorafleet.serving.contract import EngineLike, adapter_levels
from lorafleet.serving.sources import DictBlobs

D1, D2 = digest_of(b"one"), digest_of(b"two")
MEMBERS = [name for name, _ in inspect.getmembers(EngineLike, inspect.isfunction) if not name.startswith("_")]


def test_engine_meets_the_contract(make_engine):
    assert isinstance(make_engine(DictBlobs()), EngineLike)


def test_remote_engine_meets_the_contract():
    assert {"start", "stop", "submit", "generate", "pin", "unpin", "residency_snapshot"} <= set(MEMBERS)
    for name in MEMBERS:
        ours = inspect.signature(getattr(EngineLike, name)).parameters
        theirs = inspect.signature(getattr(RemoteEngine, name)).parameters
        assert list(theirs)[: len(ours)] == list(ours), name
    assert isinstance(RemoteEngine(engine_handle=None, board_handle=None), EngineLike)


def test_one_normal_form_for_the_adapter_argument():
    assert adapter_levels(None) == adapter_levels(()) == ()
    assert adapter_levels(D1) == (D1,) and adapter_levels([D1, D2]) == (D1, D2)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        adapter_levels(("A" * 64,))
    with pytest.raises(ValueError, match="a tuple of digests"):
        adapter_levels(42)
