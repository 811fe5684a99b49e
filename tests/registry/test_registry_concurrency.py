"""Concurrent writers in separate processes: distinct gapless numbers, consistent alias moves,
a complete audit chain, and no dangling alias when gc races alias moves."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from registry_helpers import REF, alias_worker, blob, commit_worker, gc_worker, prov, run_worker

from lorafleet.registry import Registry
from lorafleet.registry.registry import live_stack

WORKERS = 4


def _run_all(jobs: list[tuple]) -> list:
    """Run ``(fn, args_without_barrier)`` jobs in separate spawned processes that start together."""
    ctx = mp.get_context("spawn")  # never fork a process holding database connections
    start, results = ctx.Barrier(len(jobs)), ctx.Queue()
    procs = [ctx.Process(target=run_worker, args=(fn, (*args, start), results, i)) for i, (fn, args) in
             enumerate(jobs)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    try:
        for _ in procs:
            slot, ok, value = results.get(timeout=240)
            assert ok, value
            out[slot] = value
    finally:
        for p in procs:
            p.join(timeout=60)
    return [out[i] for i in range(len(jobs))]


def _run(target, arg_lists: list[tuple]) -> list:
    return _run_all([(target, args) for args in arg_lists])


def _assert_integrity(reg: Registry) -> None:
    if reg.engine.dialect.name == "sqlite":
        with reg.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


def test_concurrent_commits_get_distinct_gapless_numbers(registry_url, blob_url):
    per_worker = 6
    with Registry(registry_url, blob_url):
        pass  # migrate once up front so the workers time only commits
    got = _run(commit_worker, [(registry_url, blob_url, REF, w, per_worker) for w in range(WORKERS)])
    numbers = sorted(n for worker in got for n in worker)
    assert numbers == list(range(1, WORKERS * per_worker + 1))
    for worker in got:
        assert worker == sorted(worker)  # each worker's own commits are ordered
    with Registry(registry_url, blob_url) as reg:
        history = reg.history(REF)
        assert [r.number for r in history] == numbers
        assert len({r.digest for r in history}) == len(history)
        assert [r.created_at for r in history] == sorted(r.created_at for r in history)
        sent = {blob(f"worker {w} blob {i}") for w in range(WORKERS) for i in range(per_worker)}
        for rev in history:
            assert reg.read_blob(rev.digest) in sent
        assert reg.get_adapter(REF).latest == len(numbers)
        # candidate moved once per commit; its audit chain is unbroken and ends at the newest
        chain = [e for e in reversed(reg.audit(REF, limit=1000)) if e.alias == "candidate"]
        assert len(chain) == len(numbers)
        assert [e.from_number for e in chain] == [None] + [e.to_number for e in chain[:-1]]
        assert chain[-1].to_number == reg.resolve(f"{REF}@candidate").number == len(numbers)
        _assert_integrity(reg)


def test_racing_alias_moves_leave_a_consistent_audit_chain(registry_url, blob_url):
    latest, moves = 5, 10
    with Registry(registry_url, blob_url) as reg:
        for i in range(latest):
            reg.commit(REF, blob(f"r{i}".encode()), prov(), aliases=())
    done = _run(alias_worker, [(registry_url, blob_url, REF, w, moves, latest) for w in range(WORKERS)])
    with Registry(registry_url, blob_url) as reg:
        chain = [e for e in reversed(reg.audit(REF, limit=1000)) if e.alias == "live"]
        assert len(chain) == sum(done)  # every acknowledged move is recorded, nothing else
        assert chain[0].from_number is None
        for before, after in zip(chain, chain[1:], strict=False):
            assert after.from_number == before.to_number, (before, after)  # no lost update
        assert [e.id for e in chain] == sorted(e.id for e in chain)
        assert reg.resolve(REF).number == chain[-1].to_number
        assert live_stack([(e.action, e.to_number) for e in chain])[-1] == chain[-1].to_number
        assert {e.actor for e in chain} <= {f"w{w}" for w in range(WORKERS)}
        _assert_integrity(reg)


def test_gc_racing_alias_moves_and_commits_leaves_no_dangling_alias(registry_url, blob_url):
    with Registry(registry_url, blob_url) as reg:
        for i in range(8):
            reg.commit(REF, blob(f"r{i}".encode()), prov(), aliases=())
        reg.set_alias(REF, "live", 1)
    jobs = [
        (alias_worker, (registry_url, blob_url, REF, 0, 12, 8)),
        (alias_worker, (registry_url, blob_url, REF, 1, 12, 8)),
        (gc_worker, (registry_url, blob_url, 4)),
        (commit_worker, (registry_url, blob_url, REF, 9, 4)),
    ]
    outcomes = _run_all(jobs)
    with Registry(registry_url, blob_url) as reg:
        info = reg.get_adapter(REF)
        existing = {r.number for r in reg.history(REF)}
        for alias, number in info.aliases.items():
            assert number in existing, f"alias {alias} dangles at #{number}"
        for rev in reg.history(REF):
            assert reg.read_blob(rev.digest)
        assert info.latest == 12  # 8 + the 4 racing commits, none lost
        assert max(existing) == 12
        moved = outcomes[0] + outcomes[1]
        chain = [e for e in reversed(reg.audit(REF, limit=1000)) if e.alias == "live"]
        assert len(chain) == 1 + moved  # the initial set + every acknowledged move
        for before, after in zip(chain, chain[1:], strict=False):
            assert after.from_number == before.to_number
        _assert_integrity(reg)


@pytest.mark.parametrize("openers", [4])
def test_concurrent_first_open_migrates_once(tmp_path, openers):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    got = _run(commit_worker, [(url, str(tmp_path / "b"), f"t/u/a{w}", w, 1) for w in range(openers)])
    assert got == [[1]] * openers
