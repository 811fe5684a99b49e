"""Forgetting a user leaves nothing: one user who used every feature — a training job, a Tinker run with training
checkpoints, a sampler checkpoint and an ephemeral sampler, chats with capture and feedback, a dashboard pin, an
adapter resident in the engine — is forgotten through the admin API, and then nothing of them is found in any file
under the data dir (raw bytes: the SQLite file and its WAL included), any database row (SQLite and PostgreSQL), the
engine's residency or the Tinker service's memory; another user of the same tenant keeps everything."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import tinker
from tinker import types

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.api.forget import PLACES
from lorafleet.api.service import Service
from lorafleet.api.tinker import TinkerConfig, TinkerService
from lorafleet.base import load_base
from lorafleet.registry import Provenance, Registry
from lorafleet.registry.retention import _referenced
from lorafleet.registry.schema import metadata
from lorafleet.serving.engine import Engine
from lorafleet.serving.params import EngineConfig
from lorafleet.serving.sources import registry_fetch
from lorafleet.testing.harness import LoopbackServer
from lorafleet.training.data import dataset_from_records
from lorafleet.training.jobs import JobQueue
from lorafleet.training.trainer import TrainConfig
from lorafleet.training.worker import Worker, WorkerConfig

ALICE, BOB = "acme/alice/assistant", "acme/bob/assistant"
SECRET_CHAT = "zebra-lighthouse-4711"  # alice's private question
SECRET_REWRITE = "quokka-sonnet-0815"  # her rewrite (feedback)
SECRET_TRAIN = "narwhal-ledger-2323"  # her training data (the job's dataset)


def _commit_live(reg, base, ref: str, seed: int) -> str:
    adapter = LoraAdapter.create(base, LoraSpec(rank=4, alpha=8, target_modules="all"), seed=seed, init="random")
    reg.create_adapter(ref, exist_ok=True)
    rev = reg.commit(ref, to_bytes(adapter), Provenance(base_fingerprint=base.fingerprint, method="test"),
                     aliases=("candidate", "live"))
    return rev.digest


def _rows_text(engine) -> str:
    with engine.connect() as conn:
        return "\n".join(repr(tuple(r)) for t in metadata.sorted_tables for r in conn.execute(sa.select(t)))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _datum(tok, text: str) -> types.Datum:
    ids = tok.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


def _tinker_user(sc, base, adapter: str, checkpoints: list[str]):
    tc = sc.create_lora_training_client(base_model=base.name, rank=4, seed=0,
                                        user_metadata={"lorafleet_adapter": adapter}).result()
    tok = base.tokenizer
    data = [_datum(tok, f"{SECRET_TRAIN} the cat sat on the mat"), _datum(tok, "hello world")]
    for name in checkpoints:
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        tc.save_state(name).result()
    return tc


def test_forget_leaves_nothing_anywhere(registry_url, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LORAFLEET_HOME", str(home))
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    if registry_url.startswith("sqlite"):  # the default layout: the database file inside the data dir
        registry_url = f"sqlite:///{home / 'registry.db'}"
    reg = Registry(registry_url, str(home / "blobs"))
    base = load_base("tiny")
    engine = Engine(base, registry_fetch(reg), EngineConfig(max_batch=8, max_active=2, max_cached=8, max_rank=16))
    service = Service(reg, base, engine)
    _, admin = service.keys.create(admin=True)
    _, acme = service.keys.create(tenant="acme")
    alice_live = _commit_live(reg, base, ALICE, 1)
    bob_live = _commit_live(reg, base, BOB, 2)
    tk = TinkerService(service, TinkerConfig(long_poll_s=5.0, gap_wait_s=0.5, pack_wait_s=0.0))
    assert tk.home == home / "tinker"
    with LoopbackServer(service) as srv:
        srv.app.state.tinker = tk
        as_admin = httpx.Client(base_url=srv.url, headers={"authorization": f"Bearer {admin}"}, timeout=120)
        as_acme = httpx.Client(base_url=srv.url, headers={"authorization": f"Bearer {acme}"}, timeout=120)

        # chat with capture and feedback (alice), and a chat of bob's
        assert as_admin.put(f"/v1/adapters/{ALICE}/memory", json={"capture": True}).status_code == 200
        chat = {"messages": [{"role": "user", "content": f"what about {SECRET_CHAT}?"}], "max_tokens": 4,
                "temperature": 0}
        served = as_acme.post("/v1/chat/completions", json={"model": ALICE, **chat})
        assert served.status_code == 200, served.text
        fb = as_acme.post("/v1/feedback", json={"response_id": served.json()["id"], "rewrite": SECRET_REWRITE})
        assert fb.status_code == 201, fb.text
        assert as_acme.post("/v1/chat/completions", json={"model": BOB, **chat}).status_code == 200
        # pinned on the dashboard (resident in the engine)
        pin = as_admin.post(f"/ui/api/adapters/{ALICE}/pin", json={"pinned": True})
        assert pin.status_code == 200, pin.text

        # a training job, checkpointed every step (earlier checkpoints are superseded), committed as #2
        records = [{"messages": [{"role": "user", "content": f"{SECRET_TRAIN} {i}"},
                                 {"role": "assistant", "content": "noted"}]} for i in range(4)]
        job = JobQueue(reg).submit(ALICE, dataset_from_records(records, "sft"),
                                   LoraSpec(rank=4, alpha=8, target_modules="all"),
                                   TrainConfig(steps=3, batch_size=2, max_len=64))
        Worker(reg, base, WorkerConfig(checkpoint_every=1)).run(until_idle=True)
        job = JobQueue(reg).get(job.id)
        assert job.state == "succeeded" and job.result_number == 2 and job.checkpoint_digest

        # Tinker: two training checkpoints, a sampler checkpoint (revision of acme/alice/tinker), an ephemeral
        # sampler (a blob no revision names), a sample from it; bob has a run and a checkpoint too
        sc = tinker.ServiceClient(base_url=srv.url, api_key="tml-" + acme)
        tok = base.tokenizer
        tc = _tinker_user(sc, base, "alice/tinker", ["alice-ck1", "alice-ck2"])
        ck_path = f"tinker://{tc.model_id}/weights/alice-ck2"
        tc.save_weights_for_sampler("alice-s1").result()
        tc.forward_backward([_datum(tok, "one more step")], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        ephemeral = tc.save_weights_and_get_sampling_client().result()  # other weights: a blob of its own
        prompt = types.ModelInput.from_ints(tok.encode("the cat"))
        assert ephemeral.sample(prompt, 1, types.SamplingParams(max_tokens=3, temperature=0.0)).result().sequences
        bob_tc = _tinker_user(sc, base, "bob/tinker", ["bob-ck"])
        bob_ck = f"tinker://{bob_tc.model_id}/weights/bob-ck"

        # what identifies alice: her name, her secrets, every digest of hers, her Tinker run id
        alice_digests = {r.digest for ref in (ALICE, "acme/alice/tinker") for r in reg.history(ref)}
        alice_digests |= {job.dataset_digest, job.checkpoint_digest}
        alice_digests |= {d for run in tk.runs.values() if run.ref.startswith("acme/alice/")
                          for d in run.ephemeral_digests}
        assert len(alice_digests) >= 6 and all(reg.blobs.exists(d) for d in alice_digests)
        with reg.engine.connect() as conn:  # the job's superseded checkpoints (steps 1, 2) are gone already
            present = sorted(reg.blobs.iter_digests())
            orphans = set(present) - _referenced(conn, present)
        assert orphans == {d for run in tk.runs.values() for d in run.ephemeral_digests}, orphans
        markers = [b"alice", SECRET_CHAT.encode(), SECRET_REWRITE.encode(), SECRET_TRAIN.encode(),
                   tc.model_id.encode()] + [d.encode() for d in alice_digests]
        tinker_files = list((home / "tinker").rglob("alice-ck*"))
        assert len(tinker_files) == 4  # two checkpoints, each safetensors + json sidecar
        assert alice_live in {r["digest"] for r in engine.residency_snapshot()["ram"]}

        # forget alice through the admin API
        r = as_admin.delete("/v1/users/acme/alice")
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["places"] == [p.name for p in PLACES]
        assert report["adapters"] == 2 and report["jobs"] == 1 and report["tinker_runs"] == 1
        assert report["tinker_checkpoint_files"] == 4 and report["interactions"] == 1 and report["feedback"] == 1

        # files: nothing under the data dir holds any marker of alice (raw bytes, database file and WAL included)
        files = _files(home)
        assert ("registry.db" in files) == registry_url.startswith("sqlite") and "tinker/acme" in str(list(files))
        hits = {name: [m.decode() for m in markers if m in data] for name, data in files.items()}
        assert not {k: v for k, v in hits.items() if v}, hits
        assert not any("alice" in name for name in files)
        # the database, row by row (PostgreSQL's rows live outside the data dir)
        text = _rows_text(reg.engine)
        assert not [m for m in markers if m.decode() in text]
        assert all(not reg.blobs.exists(d) for d in alice_digests)
        # ...and no blob at all that nothing references (a superseded job checkpoint holds no name, only weights)
        with reg.engine.connect() as conn:
            present = sorted(reg.blobs.iter_digests())
            assert set(present) == _referenced(conn, present), "unreferenced blobs outlived the forget"
        # caches: engine residency (slots, RAM, pins) and Tinker's runs, samplers, futures, parsed adapters
        snap = engine.residency_snapshot()
        resident = {s["digest"] for s in snap["slots"]} | {x["digest"] for x in snap["ram"]} | set(snap["loading"])
        assert not resident & alice_digests
        assert all(not run.ref.startswith("acme/alice/") for run in tk.runs.values())
        assert all(s.ref is None or not s.ref.startswith("acme/alice/") for s in tk.samplers.values())
        assert not set(tk._adapters) & alice_digests
        assert all(ref.startswith("acme/bob/") for ref in tk._future_refs.values())

        # the tenant cannot get any of it back
        with pytest.raises(Exception, match="does not exist"):
            sc.create_training_client_from_state(ck_path).result()
        with pytest.raises(Exception, match="does not exist"):
            sc.create_sampling_client(model_path=f"tinker://{tc.model_id}/sampler_weights/alice-s1").result()
        assert as_acme.post("/v1/chat/completions", json={"model": ALICE, **chat}).status_code == 404

        # bob keeps everything: his adapter serves, his checkpoint loads, his blobs stay
        assert as_acme.post("/v1/chat/completions", json={"model": BOB, **chat}).status_code == 200
        assert sc.create_training_client_from_state(bob_ck).result().model_id
        assert reg.blobs.exists(bob_live) and (home / "tinker" / "acme").is_dir()
        as_admin.close()
        as_acme.close()
    tk.stop()
    engine.close()
    reg.close()


def test_forget_offline_reaches_checkpoint_files_of_a_past_server(tmp_path, monkeypatch):
    """`lorafleet forget` without a server: the Tinker checkpoint files a previous server process left are found by
    their sidecar and deleted; another user's files in the same tenant stay."""
    from lorafleet.api.forget import forget_user

    home = tmp_path / "home"
    monkeypatch.setenv("LORAFLEET_HOME", str(home))
    reg = Registry(f"sqlite:///{home / 'registry.db'}", str(home / "blobs"))
    for user, run in (("alice", "s1:train:0"), ("bob", "s2:train:0")):
        folder = home / "tinker" / "acme" / run
        folder.mkdir(parents=True)
        (folder / "ck.json").write_text(f'{{"ref": "acme/{user}/tinker", "spec": {{}}}}')
        (folder / "ck.safetensors").write_bytes(b"weights of " + user.encode())
        (folder / "ck.tmp").write_bytes(b"half-written")
    report = forget_user(reg, "acme", "alice", actor="test")
    assert report["tinker_checkpoint_files"] == 3 and "tinker-sessions" not in report["places"]
    assert not (home / "tinker" / "acme" / "s1:train:0").exists()
    assert sorted(os.listdir(home / "tinker" / "acme" / "s2:train:0")) == ["ck.json", "ck.safetensors", "ck.tmp"]
    reg.close()
