"""A user's memory: capture opt-in, size bounds, feedback -> SFT/DPO records (and its error cases), and
forgetting: nothing of the user stays readable in the registry, the blob store, the RAM cache or compute slots."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from registry_helpers import blob

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.api.forget import forget_user
from lorafleet.base import load_base
from lorafleet.registry import InvalidArgumentError, NotFoundError, Provenance, Registry
from lorafleet.registry.memory import FORGET_ACTION, MemoryStore, user_hash
from lorafleet.registry.schema import metadata
from lorafleet.serving.engine import Engine
from lorafleet.serving.params import EngineConfig, SamplingParams
from lorafleet.serving.sources import registry_fetch
from lorafleet.training.data import dataset_from_records
from lorafleet.training.jobs import JobQueue
from lorafleet.training.trainer import TrainConfig

REF = "acme/alice/assistant"
FP = "f" * 64
SECRET = "zebra-lighthouse-4711"
MSGS = [{"role": "user", "content": f"tell me about {SECRET}"}]


@pytest.fixture
def store(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}", str(tmp_path / "blobs"))
    reg.create_adapter(REF)
    yield MemoryStore(reg)
    reg.close()


def _capture(store: MemoryStore, rid: str, response: str, prompt=MSGS, ref: str = REF) -> None:
    assert store.record(ref, rid, prompt=prompt, response=response, revision=1)


def test_capture_is_opt_in_and_bounded(store):
    assert not store.record(REF, "r0", prompt=MSGS, response="x", revision=1)  # off by default
    assert store.interaction("r0") is None
    store.configure(REF, capture=True)
    small = MemoryStore(store.registry, max_interactions=3, max_feedback=2)
    for i in range(5):
        assert small.record(REF, f"r{i}", prompt=MSGS, response=f"answer {i}", revision=1)
    kept = [r["response_id"] for r in small.export("acme", "alice")["interactions"]]
    assert kept == ["r2", "r3", "r4"]  # the oldest were trimmed
    for _ in range(3):
        small.add_feedback("r4", rating=1)
    assert len(small.export("acme", "alice")["feedback"]) == 2
    store.configure(REF, capture=False)
    assert not store.record(REF, "r9", prompt=MSGS, response="x", revision=1)


def test_feedback_becomes_sft_and_dpo_records(store):
    store.configure(REF, capture=True)
    _capture(store, "a", "first answer")
    _capture(store, "b", "second answer")
    up = store.add_feedback("a", rating=1)
    assert up["method"] == "sft" and up["record"]["messages"][-1] == {"role": "assistant", "content": "first answer"}
    down = store.add_feedback("a", rating=-1)
    assert down["method"] is None and down["record"] is None  # recorded, not an example
    rewrite = store.add_feedback("b", rewrite="what I wanted", rating=-1)
    assert rewrite["kind"] == "rewrite" and rewrite["record"]["messages"] == [
        *MSGS, {"role": "assistant", "content": "what I wanted"}]
    choice = store.add_feedback("a", other_id="b", preferred="other")
    assert choice["method"] == "dpo" and choice["record"] == {"prompt": MSGS, "chosen": "second answer",
                                                              "rejected": "first answer"}
    dataset_from_records([choice["record"]], "dpo")  # valid training records
    dataset_from_records([up["record"], rewrite["record"]], "sft")
    assert [e["id"] for e in store.examples(REF)] == [up["id"], rewrite["id"], choice["id"]]
    assert [e["id"] for e in store.examples(REF, after=up["id"], upto=rewrite["id"])] == [rewrite["id"]]
    info = store.show("acme", "alice")
    assert info["adapters"]["assistant"]["interactions"] == 2 and info["adapters"]["assistant"]["examples"] == 3


FEEDBACK_ERRORS = [
    ({}, InvalidArgumentError, "needs a rating"),
    ({"rating": 5}, InvalidArgumentError, "rating must be one of"),
    ({"rating": True}, InvalidArgumentError, "rating must be one of"),
    ({"rewrite": "  "}, InvalidArgumentError, "non-empty"),
    ({"rewrite": "x", "other_id": "b"}, InvalidArgumentError, "not both"),
    ({"other_id": "a"}, InvalidArgumentError, "same response"),
    ({"other_id": "c"}, InvalidArgumentError, "same prompt"),
    ({"other_id": "d"}, InvalidArgumentError, "identical"),
    ({"other_id": "b", "preferred": "mine"}, InvalidArgumentError, "preferred"),
    ({"other_id": "nope"}, NotFoundError, "not captured"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), FEEDBACK_ERRORS)
def test_feedback_errors_change_nothing(store, kwargs, exc, match):
    store.configure(REF, capture=True)
    _capture(store, "a", "first answer")
    _capture(store, "b", "second answer")
    _capture(store, "c", "third", prompt=[{"role": "user", "content": "another question"}])
    _capture(store, "d", "first answer")
    with pytest.raises(exc, match=match):
        store.add_feedback("a", **kwargs)
    assert store.export("acme", "alice")["feedback"] == []


def test_feedback_is_tenant_scoped(store):
    store.configure(REF, capture=True)
    _capture(store, "a", "first answer")
    with pytest.raises(NotFoundError):
        store.add_feedback("a", rating=1, tenant="globex")
    assert store.add_feedback("a", rating=1, tenant="acme")["method"] == "sft"


def _adapter(base, seed: int) -> bytes:
    adapter = LoraAdapter.create(base, LoraSpec(rank=4, alpha=8, target_modules="all"), seed=seed, init="random")
    return to_bytes(adapter)


def _rows_text(engine) -> str:
    """Every row of every table, as text."""
    out = []
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            out += [repr(tuple(r)) for r in conn.execute(sa.select(table))]
    return "\n".join(out)


def test_forget_leaves_nothing_readable(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}", str(tmp_path / "blobs"))
    base = load_base("tiny")
    store = MemoryStore(reg)
    own, shared = _adapter(base, 1), _adapter(base, 2)
    prov = Provenance(base_fingerprint=base.fingerprint, method="test")
    reg.create_adapter(REF)
    r1 = reg.commit(REF, own, prov, aliases=("live",))
    r2 = reg.commit(REF, shared, prov, aliases=("candidate",))
    bob = reg.commit("acme/bob/assistant", shared, prov, aliases=("live",))  # bob has the same bytes (digest)
    store.configure(REF, capture=True, enabled=True, policy={"min_examples": 2})
    _capture(store, "resp-1", f"the {SECRET} answer")
    fb = store.add_feedback("resp-1", rewrite=f"better {SECRET}")
    job = JobQueue(reg).submit(REF, dataset_from_records([fb["record"]], "sft"),
                               LoraSpec(rank=4, alpha=8, target_modules="all"), TrainConfig(steps=1))
    engine = Engine(base, registry_fetch(reg), EngineConfig(max_batch=4, max_active=2, max_cached=4, max_rank=8))
    for digest in (r1.digest, r2.digest):
        assert engine.generate(["hi"], [digest], SamplingParams(max_tokens=2))[0].ok
    snap = engine.residency_snapshot()
    slot_of_own = next(s["slot"] for s in snap["slots"] if s["digest"] == r1.digest)
    assert any(s["digest"] == r1.digest for s in snap["slots"]) or any(r["digest"] == r1.digest for r in snap["ram"])

    report = forget_user(store.registry, "acme", "alice", actor="admin-7", memory=store, purge=engine.purge)
    assert report["adapters"] == 1 and report["revisions"] == 2 and report["interactions"] == 1
    assert report["feedback"] == 1 and report["jobs"] == 1 and report["blobs_shared_kept"] == 1

    # registry: no adapter, revision, alias, setting, job or memory row of alice; only the tombstone
    with pytest.raises(NotFoundError):
        reg.resolve(REF)
    with pytest.raises(NotFoundError):
        reg.audit(REF)
    with pytest.raises(NotFoundError):
        JobQueue(reg).get(job.id)
    assert reg.list_adapters(tenant="acme", user="alice")[0] == []
    assert store.export("acme", "alice")["interactions"] == [] and store.settings(REF).policy == {}
    text = _rows_text(reg.engine)
    assert "alice" not in text and SECRET not in text
    tomb = reg.audit(limit=1)[0]
    assert tomb.action == FORGET_ACTION and tomb.actor == "admin-7" and user_hash("acme", "alice") in tomb.ref
    # blob store: alice's own adapter and the job's dataset are gone; the digest bob shares stays, his only
    assert not reg.blobs.exists(r1.digest) and not reg.blobs.exists(job.dataset_digest)
    assert all(SECRET.encode() not in reg.blobs.get(d) for d in reg.blobs.iter_digests())
    info, data = reg.load("acme/bob/assistant", base_fingerprint=base.fingerprint)
    assert info.digest == bob.digest == r2.digest and data == shared
    # engine: alice's adapter is in no residency tier, and its compute slot was zeroed
    snap = engine.residency_snapshot()
    assert all(s["digest"] != r1.digest for s in snap["slots"]) and all(r["digest"] != r1.digest for r in snap["ram"])
    assert all(float(t[slot_of_own].abs().sum()) == 0.0 for t in engine.table.A.values())
    assert all(float(t[slot_of_own].abs().sum()) == 0.0 for t in engine.table.B.values())
    # forgetting again is harmless: nothing left to delete
    again = forget_user(store.registry, "acme", "alice", actor="admin-7", memory=store)
    assert again["adapters"] == 0 and again["blobs_deleted"] == 0
    engine.close()
    reg.close()


def test_forget_names_bad_input(store):
    with pytest.raises(InvalidArgumentError, match="user segment"):
        forget_user(store.registry, "acme", "Alice/../x")
    assert store.registry.get_adapter(REF)  # nothing changed


def test_forget_on_both_databases(registry_url, tmp_path):
    """The same deletion and shared-blob rule on SQLite and PostgreSQL (the gc lock is taken on both)."""
    reg = Registry(registry_url, str(tmp_path / "blobs"))
    store = MemoryStore(reg)
    prov = Provenance(base_fingerprint=FP)
    own = reg.commit(REF, blob(b"alice only"), prov, aliases=("live",))
    shared = reg.commit(REF, blob(b"shared bytes"), prov)
    reg.commit("acme/bob/assistant", blob(b"shared bytes"), prov, aliases=("live",))
    store.configure(REF, capture=True)
    _capture(store, "resp-1", SECRET)
    store.add_feedback("resp-1", rating=1)
    report = forget_user(store.registry, "acme", "alice", actor="admin", memory=store)
    assert (report["revisions"], report["interactions"], report["feedback"]) == (2, 1, 1)
    assert not reg.blobs.exists(own.digest) and reg.blobs.exists(shared.digest)
    assert SECRET not in _rows_text(reg.engine) and "alice" not in _rows_text(reg.engine)
    assert reg.resolve("acme/bob/assistant").digest == shared.digest
    reg.close()
