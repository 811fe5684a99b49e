"""The registry's Python API on SQLite and PostgreSQL: identities, revisions, aliases, audit."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from registry_helpers import BASE, REF, blob, prov

from lorafleet.registry import (
    AlreadyExistsError,
    BaseMismatchError,
    InvalidArgumentError,
    InvalidNameError,
    InvalidProvenanceError,
    NotFoundError,
    Provenance,
    Registry,
)


def test_create_get_and_exist_ok(registry):
    info = registry.create_adapter(REF, creator="alice", description="my assistant")
    assert (info.tenant, info.user, info.name, info.ref) == ("acme", "alice", "assistant", REF)
    assert info.latest is None and info.aliases == {} and info.creator == "alice"
    assert info.created_at.tzinfo is not None
    assert registry.get_adapter(REF) == info
    with pytest.raises(AlreadyExistsError, match="acme/alice/assistant.*already exists"):
        registry.create_adapter(REF)
    assert registry.create_adapter(REF, exist_ok=True) == info


@pytest.mark.parametrize("kind", ["raw", "peft_safetensors", "empty"])
def test_commit_refuses_bytes_that_are_not_adapter_blobs(registry, kind):
    """A raw PEFT safetensors (or any bytes) committed would fail every later load: refused, nothing stored."""
    import torch
    from safetensors.torch import save

    data = {"raw": b"weights", "empty": b"",
            "peft_safetensors": save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(1, 4),
                                      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(4, 1)})}[kind]
    with pytest.raises(InvalidArgumentError, match="not a canonical lorafleet adapter blob"):
        registry.commit(REF, data, prov())
    with pytest.raises(NotFoundError):
        registry.get_adapter(REF)
    assert list(registry.blobs.iter_digests()) == []
    assert registry.commit(REF, blob(b"ok"), prov()).number == 1


def test_get_missing_adapter(registry):
    with pytest.raises(NotFoundError, match="adapter 'acme/bob/x' does not exist"):
        registry.get_adapter("acme/bob/x")


def test_commit_numbers_are_gapless_and_content_addressed(registry):
    revs = [registry.commit(REF, blob(f"blob {i}".encode()), prov()) for i in range(3)]
    assert [r.number for r in revs] == [1, 2, 3]
    for i, rev in enumerate(revs):
        assert rev.digest == hashlib.sha256(blob(f"blob {i}")).hexdigest()
        assert rev.size == len(blob(f"blob {i}"))
        assert rev.address == f"{REF}#{rev.number}"
        assert registry.read_blob(rev.digest) == blob(f"blob {i}")
    assert registry.get_adapter(REF).latest == 3
    # candidate follows the newest commit by default
    assert registry.resolve(f"{REF}@candidate").number == 3
    assert [r.number for r in registry.history(REF)] == [1, 2, 3]


def test_identical_bytes_share_one_blob(registry, blob_url):
    a = registry.commit(REF, blob(b"same bytes"), prov())
    b = registry.commit("acme/bob/other", blob(b"same bytes"), prov())
    assert a.digest == b.digest and (a.number, b.number) == (1, 1)
    assert list(registry.blobs.iter_digests()) == [a.digest]


def test_commit_without_create_needs_existing_adapter(registry):
    with pytest.raises(NotFoundError, match="does not exist"):
        registry.commit(REF, blob(b"x"), prov(), create=False)
    registry.create_adapter(REF)
    assert registry.commit(REF, blob(b"x"), prov(), create=False).number == 1


def test_resolve_forms(registry):
    registry.commit(REF, blob(b"one"), prov())
    registry.commit(REF, blob(b"two"), prov(), aliases=["candidate", "live", "beta"])
    registry.commit(REF, blob(b"three"), prov())
    assert registry.resolve(REF).number == 2
    assert registry.resolve(f"{REF}@live").number == 2
    assert registry.resolve(f"{REF}@beta").number == 2
    assert registry.resolve(f"{REF}@candidate").number == 3
    rev1 = registry.resolve(f"{REF}#1")
    assert rev1.number == 1 and rev1.aliases == [] and rev1.provenance.base_fingerprint == BASE
    assert registry.resolve(f"{REF}#2").aliases == ["beta", "live"]


RESOLVE_ERRORS = [
    ("acme/nobody/x", "adapter 'acme/nobody/x' does not exist"),
    (f"{REF}#9", r"revision acme/alice/assistant#9 does not exist: the latest is #1"),
    (f"{REF}@beta", "alias 'beta' is not set on adapter"),
    (REF, "has no live revision yet.*alias acme/alice/assistant live N"),
    (f"{REF}@Bad", "invalid alias name 'Bad'"),
]


@pytest.mark.parametrize(("address", "message"), RESOLVE_ERRORS)
def test_resolve_errors_name_the_problem(registry, address, message):
    registry.commit(REF, blob(b"one"), prov())
    with pytest.raises((NotFoundError, InvalidNameError), match=message):
        registry.resolve(address)


def test_provenance_is_recorded_and_parent_digest_filled(registry):
    first = registry.commit(REF, blob(b"v1"), prov(method="sft", hyperparams={"r": 8, "lr": 1e-4}, example_count=10,
                                             dataset_digest="d" * 64), creator="trainer")
    second = registry.commit(REF, blob(b"v2"), prov(parent=1, method="dpo"))
    got = registry.resolve(f"{REF}#1").provenance
    assert got.method == "sft" and got.hyperparams == {"r": 8, "lr": 1e-4}
    assert got.example_count == 10 and got.dataset_digest == "d" * 64
    assert got.creator == "trainer" and got.code_version.startswith("0.")
    assert got.created_at is not None and got.created_at.tzinfo is not None
    assert second.provenance.parent_digest == first.digest
    assert registry.resolve(f"{REF}#2").provenance.parent_digest == first.digest


PROVENANCE_ERRORS = [
    (dict(parent=5), InvalidProvenanceError, "parent #5 .* must be an earlier revision"),
    (dict(parent=1, parent_digest="0" * 64), InvalidProvenanceError, "parent_digest .* does not match"),
    (dict(parent=1, base_fingerprint="other-base"), BaseMismatchError, "parent .*#1 was trained for base"),
    (dict(base_fingerprint=""), InvalidProvenanceError, "'base_fingerprint' is required"),
    (dict(hyperparams={"x": object()}), InvalidProvenanceError, "'hyperparams' must be JSON-serializable"),
    (dict(metrics={"loss": float("nan")}), InvalidProvenanceError, "'metrics' must be JSON-serializable"),
    (dict(example_count=-1), InvalidProvenanceError, "'example_count' must be a non-negative integer"),
    (dict(parent=0), InvalidProvenanceError, "'parent' must be a revision number >= 1"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), PROVENANCE_ERRORS)
def test_bad_provenance_is_refused_and_nothing_is_committed(registry, kwargs, error, message):
    registry.commit(REF, blob(b"v1"), prov())
    with pytest.raises(error, match=message):
        registry.commit(REF, blob(b"v2"), prov(**kwargs))
    assert registry.get_adapter(REF).latest == 1
    assert [r.number for r in registry.history(REF)] == [1]


def test_provenance_round_trips_through_dict():
    p = Provenance(base_fingerprint="fp", parent=2, method="sft", hyperparams={"r": 4}, metrics={"acc": 0.5},
                   created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert Provenance.from_dict(p.to_dict()) == p
    with pytest.raises(InvalidProvenanceError, match=r"unknown provenance field\(s\) \['bogus'\]"):
        Provenance.from_dict({**p.to_dict(), "bogus": 1})
    with pytest.raises(InvalidProvenanceError, match="'base_fingerprint' is required"):
        Provenance.from_dict({"method": "sft"})


def test_load_refuses_other_base(registry):
    registry.commit(REF, blob(b"weights"), prov(), aliases=["live"])
    rev, data = registry.load(REF, base_fingerprint=BASE)
    assert data == blob(b"weights") and rev.number == 1
    with pytest.raises(BaseMismatchError, match=r"#1 .* was trained for base 'base-fp-1', not the loaded base 'gemma'"):
        registry.load(REF, base_fingerprint="gemma")


def test_update_metrics_merges_and_leaves_rest_immutable(registry):
    rev = registry.commit(REF, blob(b"w"), prov(metrics={"train_loss": 1.5}))
    updated = registry.update_metrics(f"{REF}#1", {"heldout_acc": 0.8})
    assert updated.provenance.metrics == {"train_loss": 1.5, "heldout_acc": 0.8}
    updated = registry.update_metrics(f"{REF}@candidate", {"train_loss": 1.4})
    assert updated.provenance.metrics == {"train_loss": 1.4, "heldout_acc": 0.8}
    again = registry.resolve(f"{REF}#1")
    assert again.digest == rev.digest and again.provenance.base_fingerprint == BASE
    with pytest.raises(InvalidProvenanceError, match="'metrics' must be JSON-serializable"):
        registry.update_metrics(f"{REF}#1", {"bad": float("inf")})
    with pytest.raises(NotFoundError):
        registry.update_metrics(f"{REF}#7", {"x": 1})


def test_set_alias_records_audit_chain(registry):
    for i in range(3):
        registry.commit(REF, blob(f"b{i}".encode()), prov(), aliases=())
    e1 = registry.set_alias(REF, "live", 1, actor="gate", reason="first")
    e2 = registry.set_alias(REF, "live", 3, actor="gate", reason="better")
    assert (e1.from_number, e1.to_number, e1.actor, e1.reason, e1.action) == (None, 1, "gate", "first", "alias.set")
    assert (e2.from_number, e2.to_number) == (1, 3)
    assert registry.get_adapter(REF).aliases == {"live": 3}
    log = registry.audit(REF)
    assert [e.id for e in log] == [e2.id, e1.id]  # newest first
    with pytest.raises(NotFoundError, match="#9 does not exist"):
        registry.set_alias(REF, "live", 9)
    with pytest.raises(InvalidNameError, match="invalid alias name"):
        registry.set_alias(REF, "Live", 1)
    with pytest.raises(InvalidArgumentError, match="positive integer"):
        registry.set_alias(REF, "live", 0)
    assert registry.get_adapter(REF).aliases == {"live": 3}


def test_delete_alias(registry):
    registry.commit(REF, blob(b"x"), prov(), aliases=["candidate", "beta"])
    entry = registry.delete_alias(REF, "beta", actor="ops", reason="done")
    assert (entry.action, entry.from_number, entry.to_number) == ("alias.delete", 1, None)
    assert registry.get_adapter(REF).aliases == {"candidate": 1}
    with pytest.raises(NotFoundError, match="alias 'beta' is not set"):
        registry.delete_alias(REF, "beta", actor="ops", reason="again")


def test_rollback_walks_back_through_live_history(registry):
    for i in range(4):
        registry.commit(REF, blob(f"b{i}".encode()), prov())
    for n in (1, 2, 3):
        registry.set_alias(REF, "live", n, actor="gate")
    e = registry.rollback(REF, actor="oncall", reason="regression")
    assert (e.action, e.from_number, e.to_number, e.actor, e.reason) == ("rollback", 3, 2, "oncall", "regression")
    assert registry.resolve(REF).number == 2
    assert registry.rollback(REF).to_number == 1
    with pytest.raises(NotFoundError, match="no earlier live revision.*--to N"):
        registry.rollback(REF)
    # promote again, then roll back: back to the one before
    registry.set_alias(REF, "live", 4)
    assert registry.rollback(REF).to_number == 1
    assert registry.rollback(REF, to=3).to_number == 3
    assert registry.resolve(REF).number == 3
    with pytest.raises(NotFoundError):
        registry.rollback(REF, to=99)


def test_rollback_without_live_history(registry):
    registry.commit(REF, blob(b"x"), prov())
    with pytest.raises(NotFoundError, match="no earlier live revision"):
        registry.rollback(REF)


def test_list_adapters_keyset_pagination_and_filters(registry):
    refs = [f"{t}/{u}/a{i}" for t in ("acme", "beta", "ac_me") for u in ("al", "bo") for i in range(3)]
    for ref in refs:
        registry.create_adapter(ref)
    registry.commit("acme/al/a0", blob(b"x"), prov(), aliases=["live"])
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = registry.list_adapters(limit=4, cursor=cursor)
        seen += [a.ref for a in page]
        pages += 1
        if cursor is None:
            break
    assert seen == sorted(refs) and pages == 5
    assert [a.ref for a in registry.list_adapters(tenant="beta", user="bo")[0]] == ["beta/bo/a0", "beta/bo/a1",
                                                                                      "beta/bo/a2"]
    # '_' in a prefix is literal, not a LIKE wildcard
    assert {a.ref.split("/")[0] for a in registry.list_adapters(prefix="ac_")[0]} == {"ac_me"}
    assert len(registry.list_adapters(prefix="acme/")[0]) == 6
    assert [a.ref for a in registry.list_adapters(prefix="acme/al/a1")[0]] == ["acme/al/a1"]
    first = registry.list_adapters(prefix="acme/al/a0")[0][0]
    assert first.aliases == {"live": 1} and first.latest == 1
    assert registry.list_adapters(user="zz")[0] == []


LIST_ERRORS = [
    (dict(limit=0), InvalidArgumentError, "limit must be an integer between 1 and"),
    (dict(cursor="not-a-cursor"), InvalidArgumentError, "invalid cursor"),
    (dict(tenant="Acme"), InvalidNameError, "invalid tenant segment"),
    (dict(prefix="ACME/"), InvalidNameError, "invalid tenant segment"),
    (dict(prefix="acme/x/y/z"), InvalidNameError, "invalid prefix"),
    (dict(prefix="acme/%"), InvalidNameError, "invalid prefix"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), LIST_ERRORS)
def test_list_adapters_errors(registry, kwargs, error, message):
    with pytest.raises(error, match=message):
        registry.list_adapters(**kwargs)


def test_audit_across_adapters_and_limit(registry):
    registry.commit("t/u/a", blob(b"1"), prov())
    registry.commit("t/u/b", blob(b"2"), prov())
    entries = registry.audit()
    assert [e.ref for e in entries] == ["t/u/b", "t/u/a"]
    assert len(registry.audit(limit=1)) == 1
    with pytest.raises(NotFoundError):
        registry.audit("t/u/zzz")


def test_reopen_keeps_everything(registry_url, blob_url):
    with Registry(registry_url, blob_url) as reg:
        reg.commit(REF, blob(b"persist me"), prov(), aliases=["live"])
    with Registry(registry_url, blob_url) as reg:
        rev, data = reg.load(REF, base_fingerprint=BASE)
        assert data == blob(b"persist me") and rev.aliases == ["live"]


def test_open_default_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAFLEET_DB_URL", raising=False)
    monkeypatch.delenv("LORAFLEET_BLOB_URL", raising=False)
    with Registry.open_default() as reg:
        reg.commit(REF, blob(b"x"), prov())
    assert (tmp_path / "home" / "registry.db").exists()
    assert any((tmp_path / "home" / "blobs").iterdir())
    monkeypatch.setenv("LORAFLEET_DB_URL", f"sqlite:///{tmp_path / 'other.db'}")
    monkeypatch.setenv("LORAFLEET_BLOB_URL", str(tmp_path / "other-blobs"))
    with Registry.open_default() as reg:
        assert reg.list_adapters()[0] == []
        reg.commit(REF, blob(b"y"), prov())
    assert (tmp_path / "other.db").exists() and (tmp_path / "other-blobs").is_dir()


def test_sqlite_is_in_wal_mode_with_busy_timeout(sqlite_registry):
    with sqlite_registry.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_bad_database_url():
    from lorafleet.registry import RegistryError

    with pytest.raises(RegistryError, match="unsupported database 'mysql'"):
        Registry("mysql://x/y", "/tmp/never")
