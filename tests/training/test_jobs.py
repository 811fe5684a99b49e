"""Jobs: the persisted queue, the worker (packing, checkpoints, resume after SIGKILL), bad input."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import sqlalchemy as sa

from lorafleet.adapters import LoraSpec, from_bytes
from lorafleet.registry import NotFoundError, Registry
from lorafleet.registry.schema import jobs as jobs_table
from lorafleet.training.data import dataset_from_records
from lorafleet.training.jobs import JobError, JobQueue
from lorafleet.training.trainer import TrainConfig
from lorafleet.training.worker import Worker, WorkerConfig


def records(tag, n=6):
    return [{"messages": [{"role": "user", "content": f"q{i} {tag}"}, {"role": "assistant", "content": f"{tag} says {i}"}]}
            for i in range(n)]


@pytest.fixture()
def reg(tmp_path):
    r = Registry(f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "blobs"))
    yield r
    r.close()


SPEC = LoraSpec(rank=4, alpha=8, target_modules="all")


def _submit(queue, reg, ref, steps=4, **kw):
    reg.create_adapter(ref, exist_ok=True)
    return queue.submit(ref, dataset_from_records(records(ref.split("/")[1]), "sft"), SPEC,
                        TrainConfig(steps=steps, lr=5e-3, batch_size=2), **kw)


def test_jobs_run_packed_and_commit_candidates(tiny_base, reg):
    queue = JobQueue(reg)
    ids = [_submit(queue, reg, f"acme/u{i}/style").id for i in range(3)]
    worker = Worker(reg, tiny_base, WorkerConfig(max_jobs=8, checkpoint_every=2))
    finished = worker.run()
    assert sorted(j.id for j in finished) == ids
    assert worker.global_steps == 4  # three users packed into the same 4 steps
    for job_id in ids:
        job = queue.get(job_id)
        assert job.state == "succeeded" and job.step == 4 and len(job.losses) == 4 and job.result_number == 1
        rev = reg.resolve(f"{job.ref}@candidate")
        assert rev.number == 1
        prov = rev.provenance
        assert prov.base_fingerprint == tiny_base.fingerprint and prov.method == "sft"
        assert prov.dataset_digest == job.dataset_digest and prov.example_count == 6
        assert prov.hyperparams["rank"] == 4 and prov.hyperparams["job_id"] == job_id
        from_bytes(reg.read_blob(rev.digest), tiny_base)


def test_warm_start_from_live_records_parent(tiny_base, reg):
    queue = JobQueue(reg)
    first = _submit(queue, reg, "acme/ann/style")
    Worker(reg, tiny_base).run()
    reg.set_alias("acme/ann/style", "live", 1, reason="test")
    second = _submit(queue, reg, "acme/ann/style")
    Worker(reg, tiny_base).run()
    rev = reg.resolve("acme/ann/style#2")
    assert queue.get(second.id).result_number == 2 and queue.get(first.id).result_number == 1
    assert rev.provenance.parent == 1 and rev.provenance.parent_digest == reg.resolve("acme/ann/style#1").digest


def test_cancel_queued_and_running(tiny_base, reg):
    queue = JobQueue(reg)
    queued = _submit(queue, reg, "acme/bo/style")
    assert queue.cancel(queued.id).state == "cancelled"
    with pytest.raises(JobError, match="already cancelled"):
        queue.cancel(queued.id)
    running = _submit(queue, reg, "acme/cy/style", steps=50)
    worker = Worker(reg, tiny_base)
    worker.run(max_steps=1, until_idle=False)  # leaves it released (queued) with a checkpoint
    assert queue.get(running.id).state == "queued" and queue.get(running.id).step == 1
    worker = Worker(reg, tiny_base)
    original = worker._step

    def step_then_cancel():
        original()
        if worker.global_steps == 2:
            queue.cancel(running.id)

    worker._step = step_then_cancel
    worker.run()
    job = queue.get(running.id)
    assert job.state == "cancelled" and job.step < 50
    assert reg.history("acme/cy/style") == []  # nothing committed


@pytest.mark.parametrize(
    ("ref", "match", "exc"),
    [("acme/nobody/style", "does not exist", NotFoundError), ("acme/../x", "invalid", Exception)],
)
def test_submit_errors_leave_no_job(reg, ref, match, exc):
    queue = JobQueue(reg)
    with pytest.raises(exc, match=match):
        queue.submit(ref, dataset_from_records(records("x"), "sft"), SPEC, TrainConfig())
    assert queue.list() == []


def test_method_dataset_mismatch(reg):
    reg.create_adapter("acme/dd/style")
    with pytest.raises(JobError, match="holds 'sft' records but the method is 'dpo'"):
        JobQueue(reg).submit("acme/dd/style", dataset_from_records(records("x"), "sft"), SPEC, TrainConfig(method="dpo"))
    assert JobQueue(reg).list() == []


def test_job_with_unusable_data_fails_alone(tiny_base, reg):
    queue = JobQueue(reg)
    good = _submit(queue, reg, "acme/ok/style")
    reg.create_adapter("acme/long/style")
    too_long = [{"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}]}]
    bad = queue.submit("acme/long/style", dataset_from_records(too_long, "sft"), SPEC, TrainConfig(steps=2, max_len=32))
    Worker(reg, tiny_base).run()
    assert queue.get(good.id).state == "succeeded"
    failed = queue.get(bad.id)
    assert failed.state == "failed" and "no usable example" in failed.error


def test_claim_is_exclusive_and_leases_expire(reg):
    queue = JobQueue(reg)
    for i in range(4):
        _submit(queue, reg, f"acme/c{i}/style")
    a = queue.claim("wa", 3, lease_seconds=60)
    b = queue.claim("wb", 3, lease_seconds=60)
    assert len(a) == 3 and len(b) == 1 and not {j.id for j in a} & {j.id for j in b}
    assert queue.claim("wc", 5, lease_seconds=60) == []
    with reg.engine.begin() as conn:  # wa's lease runs out (its process died)
        conn.execute(jobs_table.update().where(jobs_table.c.worker_id == "wa").values(lease_until=sa.func.datetime("now", "-1 hour")))
    again = queue.claim("wc", 5, lease_seconds=60)
    assert {j.id for j in again} == {j.id for j in a} and all(j.attempts == 2 for j in again)
    assert not queue.heartbeat(a[0].id, "wa", lease_seconds=60, step=1, loss=0.1, losses=[0.1])  # wa lost it


WORKER_SCRIPT = textwrap.dedent("""
    import sys
    from lorafleet.base import load_base
    from lorafleet.registry import Registry
    from lorafleet.training.worker import Worker, WorkerConfig
    reg = Registry(sys.argv[1], sys.argv[2])
    Worker(reg, load_base("tiny"), WorkerConfig(lease_seconds=float(sys.argv[3]), checkpoint_every=3)).run()
""")


def test_sigkilled_worker_resumes_from_checkpoint_with_equal_result(tiny_base, tmp_path):
    db_url, blobs = f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "blobs")
    reg = Registry(db_url, blobs)
    queue = JobQueue(reg)
    data = dataset_from_records(records("same"), "sft")
    cfg = TrainConfig(steps=8, lr=5e-3, batch_size=2)
    for ref in ("acme/one/style", "acme/two/style"):
        reg.create_adapter(ref)
    first = queue.submit("acme/one/style", data, SPEC, cfg)
    env = {**os.environ, "LORAFLEET_WORKER_FAULT": "kill_after_step:4"}
    proc = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, db_url, blobs, "1"], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    job = queue.get(first.id)
    assert job.state == "running" and job.checkpoint_digest and job.step == 4  # checkpointed at step 3, then 4 done
    time.sleep(1.2)  # let the dead worker's lease expire
    subprocess.run([sys.executable, "-c", WORKER_SCRIPT, db_url, blobs, "30"], check=True, capture_output=True,
                   timeout=120)
    job = queue.get(first.id)
    assert job.state == "succeeded" and job.attempts == 2 and job.step == 8
    queue.submit("acme/two/style", data, SPEC, cfg)
    Worker(reg, tiny_base).run()
    a = from_bytes(reg.read_blob(reg.resolve("acme/one/style#1").digest))
    b = from_bytes(reg.read_blob(reg.resolve("acme/two/style#1").digest))
    diff = max(max((a.weights[n][0] - b.weights[n][0]).abs().max().item(),
                   (a.weights[n][1] - b.weights[n][1]).abs().max().item()) for n in a.weights)
    assert diff < 1e-5
    assert json.dumps(queue.get(first.id).losses) and len(queue.get(first.id).losses) == 8
    reg.close()


def test_sigkill_at_random_points_mid_step_and_mid_checkpoint_resumes_to_the_same_result(tiny_base, tmp_path):
    """Two jobs packed in the same steps; the worker is SIGKILLed again and again at random points — inside a step
    (one user's optimizer updated, the other's not), halfway through writing a checkpoint blob, or just after a
    step — each time resuming from the last durable checkpoint, until the jobs finish. The result equals an
    uninterrupted run: the same weights, the same loss curve, one revision per job, every blob intact.
    Bounded: at most 3 kills (each a fresh worker process), then one clean run. ``LORAFLEET_FAULT_SEED`` replays."""
    import random

    seed = int(os.environ.get("LORAFLEET_FAULT_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    refs = ("acme/one/style", "acme/two/style")
    cfg = TrainConfig(steps=8, lr=5e-3, batch_size=2)

    def submit(reg):
        queue = JobQueue(reg)
        for ref in refs:
            reg.create_adapter(ref)
        return queue, [queue.submit(ref, dataset_from_records(records(ref.split("/")[1]), "sft"), SPEC, cfg).id
                       for ref in refs]

    ref_reg = Registry(f"sqlite:///{tmp_path / 'ref.db'}", str(tmp_path / "ref-blobs"))
    ref_queue, ref_ids = submit(ref_reg)
    Worker(ref_reg, tiny_base, WorkerConfig(checkpoint_every=3)).run()
    want = {ref: from_bytes(ref_reg.read_blob(ref_reg.resolve(f"{ref}#1").digest)) for ref in refs}
    want_losses = [ref_queue.get(i).losses for i in ref_ids]

    db_url, blobs = f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "blobs")
    reg = Registry(db_url, blobs)
    queue, ids = submit(reg)
    kills = []
    for _ in range(3):
        left = cfg.steps - min(queue.get(i).step for i in ids)
        if left <= 0 or all(queue.get(i).state == "succeeded" for i in ids):
            break
        env = {k: v for k, v in os.environ.items() if k not in ("LORAFLEET_FAULT", "LORAFLEET_WORKER_FAULT")}
        kind = rng.choice(["mid_step", "blob_mid_write", "after_step"])
        if kind == "mid_step":  # reached once per user per step: 2 per step
            env["LORAFLEET_FAULT"] = fault = f"mid_step@{rng.randint(1, 2 * left)}"
        elif kind == "blob_mid_write":  # checkpoints every 3 steps, at the end, then the two commits
            env["LORAFLEET_FAULT"] = fault = f"blob_mid_write@{rng.randint(1, 3)}"
        else:
            env["LORAFLEET_WORKER_FAULT"] = fault = f"kill_after_step:{rng.randint(1, left)}"
        proc = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, db_url, blobs, "1"], env=env,
                              capture_output=True, timeout=120)
        assert proc.returncode in (-9, 0), f"seed {seed}, {fault}: {proc.stderr.decode()[-2000:]}"
        kills.append((fault, proc.returncode, [queue.get(i).step for i in ids]))
        time.sleep(1.2)  # the dead worker's lease expires
    assert any(rc == -9 for _, rc, _ in kills), (seed, kills)
    env = {k: v for k, v in os.environ.items() if k not in ("LORAFLEET_FAULT", "LORAFLEET_WORKER_FAULT")}
    subprocess.run([sys.executable, "-c", WORKER_SCRIPT, db_url, blobs, "30"], env=env, check=True,
                   capture_output=True, timeout=120)
    print(f"seed {seed}: {kills}")
    for job_id, ref, losses in zip(ids, refs, want_losses, strict=True):
        job = queue.get(job_id)
        assert job.state == "succeeded" and job.step == cfg.steps, (seed, kills, job)
        assert [r.number for r in reg.history(ref)] == [1], (seed, kills)
        got = from_bytes(reg.read_blob(reg.resolve(f"{ref}#1").digest))
        diff = max(max((got.weights[n][0] - want[ref].weights[n][0]).abs().max().item(),
                       (got.weights[n][1] - want[ref].weights[n][1]).abs().max().item()) for n in got.weights)
        assert diff < 1e-5, (seed, kills, ref, diff)
        assert job.losses == pytest.approx(losses, abs=1e-5), (seed, kills)
    for digest in reg.blobs.iter_digests():  # no torn blob: every one hashes to its name
        reg.blobs.get(digest)
    ref_reg.close()
    reg.close()


def test_two_workers_share_one_queue_each_job_runs_once(tiny_base, registry_url, tmp_path):
    """Two workers (threads, each with its own registry connection pool) drain one queue, on SQLite and on
    PostgreSQL (row locking with SKIP LOCKED): every job runs exactly once."""
    import threading

    blobs = str(tmp_path / "blobs")
    regs = [Registry(registry_url, blobs) for _ in range(3)]
    queue = JobQueue(regs[0])
    ids = [_submit(queue, regs[0], f"acme/w{i}/style", steps=1).id for i in range(12)]
    workers = [Worker(regs[i + 1], tiny_base, WorkerConfig(max_jobs=2), worker_id=f"worker-{i}") for i in range(2)]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    done_by = {j.id: w.worker_id for w in workers for j in w.finished}
    assert sorted(done_by) == ids  # every job finished, none twice (a dict would hide a duplicate: count below)
    assert sum(len(w.finished) for w in workers) == len(ids)
    assert all(len(w.finished) > 0 for w in workers)
    for job_id in ids:
        job = queue.get(job_id)
        assert job.state == "succeeded" and job.attempts == 1
        assert [r.number for r in regs[0].history(job.ref)] == [1]
    for r in regs:
        r.close()


def test_worker_dying_after_commit_never_commits_the_job_twice(tiny_base, registry_url, tmp_path):
    """The worker is SIGKILLed right after its commit's transaction (before the job is marked finished); then more
    revisions than any scan window (7) land on the adapter; the resumed job finds its revision through the commit
    key written in the commit's own transaction: no second revision, ``candidate`` stays where the others put it."""
    from lorafleet.adapters import LoraAdapter, to_bytes
    from lorafleet.registry import Provenance

    blobs = str(tmp_path / "blobs")
    reg = Registry(registry_url, blobs)
    queue = JobQueue(reg)
    job = _submit(queue, reg, "acme/one/style", steps=2)
    env = {**os.environ, "LORAFLEET_FAULT": "after_db_commit"}
    proc = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, registry_url, blobs, "1"], env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert queue.get(job.id).state == "running"  # committed, never marked finished
    assert [r.number for r in reg.history("acme/one/style")] == [1]
    committed = reg.resolve("acme/one/style#1")
    prov = Provenance(base_fingerprint=tiny_base.fingerprint, method="upload")
    for seed in range(7):
        other = LoraAdapter.create(tiny_base, SPEC, seed=100 + seed, init="random")
        reg.commit("acme/one/style", to_bytes(other), prov, aliases=("candidate",))
    candidate = reg.resolve("acme/one/style@candidate").number
    assert candidate == 8
    time.sleep(1.2)  # the dead worker's lease expires
    subprocess.run([sys.executable, "-c", WORKER_SCRIPT, registry_url, blobs, "30"], check=True,
                   capture_output=True, timeout=120)
    done = queue.get(job.id)
    assert done.state == "succeeded" and done.result_number == 1 and done.attempts == 2
    history = reg.history("acme/one/style")
    assert [r.number for r in history] == list(range(1, 9))
    assert [r.digest for r in history].count(committed.digest) == 1
    assert reg.resolve("acme/one/style@candidate").number == candidate
    assert reg.keyed("job", str(job.id))[1].number == 1
    reg.close()


def test_result_over_the_delta_bound_fails_the_job_and_commits_nothing(tiny_base, reg, monkeypatch):
    """A job whose trained delta is over the bound (here: the bound lowered below what any training step reaches)
    fails as diverged, like a NaN loss, instead of committing weights the engine would refuse to serve."""
    from lorafleet.adapters import weights as weights_mod

    queue = JobQueue(reg)
    job = _submit(queue, reg, "acme/wild/style", steps=2, warm_start="none")
    monkeypatch.setattr(weights_mod, "MAX_DELTA_RATIO", 1e-12)
    Worker(reg, tiny_base).run()
    done = queue.get(job.id)
    assert done.state == "failed" and "training diverged" in done.error and "over the bound" in done.error
    assert reg.history("acme/wild/style") == []
