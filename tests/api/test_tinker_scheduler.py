"""The Tinker scheduler: per-run seq_id order, gap skipping, packing of concurrent forward_backward calls."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from lorafleet.api.tinker.scheduler import Op, Scheduler
from lorafleet.api.tinker.state import TinkerUserError


@dataclass
class FakeRun:
    run_id: str
    next_seq: int = 1


def make(gap_wait_s: float = 5.0):
    log: list = []

    def pack(ops):
        log.append(("pack", sorted((o.run.run_id, o.seq_id) for o in ops)))
        return [o.seq_id for o in ops]

    def handler(op):
        if op.payload.get("fail"):
            raise TinkerUserError("bad step")
        log.append((op.kind, op.run.run_id, op.seq_id))
        return op.seq_id

    return Scheduler(pack, {"optim_step": handler}, gap_wait_s=gap_wait_s), log


def test_ops_run_in_seq_order_and_forward_backward_of_runs_is_packed():
    sched, log = make()
    a, b = FakeRun("a"), FakeRun("b")
    # Submitted out of order, before the thread starts: run a's seq 2 must wait for its seq 1.
    futs = [sched.submit(Op(a, 2, "optim_step", {})), sched.submit(Op(a, 1, "forward_backward", {})),
            sched.submit(Op(b, 1, "forward_backward", {}))]
    sched.start()
    try:
        assert [f.result(timeout=10) for f in futs] == [2, 1, 1]
    finally:
        sched.stop()
    assert log == [("pack", [("a", 1), ("b", 1)]), ("optim_step", "a", 2)]
    assert sched.packed_runs_max == 2


def test_a_missing_seq_id_is_skipped_after_the_gap_wait():
    sched, log = make(gap_wait_s=0.3)
    run = FakeRun("a")
    sched.start()
    try:
        t0 = time.monotonic()
        assert sched.submit(Op(run, 3, "optim_step", {})).result(timeout=10) == 3  # 1 and 2 never come
        assert time.monotonic() - t0 >= 0.25 and run.next_seq == 4
        assert sched.submit(Op(run, 4, "optim_step", {})).result(timeout=10) == 4  # no wait once in order
    finally:
        sched.stop()


def test_a_failing_op_fails_its_future_and_the_loop_lives_on():
    sched, _ = make()
    run = FakeRun("a")
    sched.start()
    try:
        with pytest.raises(TinkerUserError, match="bad step"):
            sched.submit(Op(run, 1, "optim_step", {"fail": True})).result(timeout=10)
        assert sched.submit(Op(run, 2, "optim_step", {})).result(timeout=10) == 2
    finally:
        sched.stop()


def test_a_just_served_client_joins_the_next_pass_instead_of_falling_out_of_step():
    sched, log = make()
    sched.pack_wait_s = 2.0
    a, b = FakeRun("a"), FakeRun("b")
    sched.start()
    try:
        sched.submit(Op(b, 1, "optim_step", {})).result(timeout=10)  # b was just served, has nothing queued
        fut_a = sched.submit(Op(a, 1, "forward_backward", {}))
        time.sleep(0.2)  # b's client is still sending its next request
        fut_b = sched.submit(Op(b, 2, "forward_backward", {}))
        assert (fut_a.result(timeout=10), fut_b.result(timeout=10)) == (1, 2)
    finally:
        sched.stop()
    assert log[-1] == ("pack", [("a", 1), ("b", 2)])
