"""The order in which clients' training requests run on the shared base, one thread for all of them.

Each run's requests execute in ``seq_id`` order (the SDK numbers a training client's forward_backward,
optim_step and save calls with one counter, and sends large batches as parallel chunks). A gap that is not
filled within ``gap_wait_s`` is skipped, so a lost request cannot wedge a run.

Multi-tenancy: every pass takes the next ready request of *each* run; all forward_backward requests among
them — different clients, different adapters, different ranks — go through one packed forward/backward on
the resident base (the trainer's operator + :class:`~lorafleet.adapters.StackedWeights`), so N clients
cost one base forward, not N. Each adapter only receives the gradient of its own rows.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lorafleet.api.tinker.state import TinkerUserError

log = logging.getLogger(__name__)


@dataclass
class Op:
    run: object  # state.Run
    seq_id: int | None
    kind: str  # "forward_backward" | "optim_step" | "save_state" | "load_state" | "save_sampler"
    payload: dict
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    arrived: float = field(default_factory=time.monotonic)


class Scheduler:
    """Runs :class:`Op` s: ``pack(list[Op])`` for forward_backward groups, ``handlers[kind](op)`` for the rest."""

    def __init__(self, pack: Callable[[list[Op]], list], handlers: dict[str, Callable[[Op], object]], *,
                 gap_wait_s: float = 5.0) -> None:
        self.pack, self.handlers, self.gap_wait_s = pack, handlers, gap_wait_s
        self._pending: dict[str, list[Op]] = {}  # run_id -> ops not yet run
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.passes = 0
        self.packed_runs_max = 0

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="lorafleet-tinker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def submit(self, op: Op) -> concurrent.futures.Future:
        with self._cv:
            self._pending.setdefault(op.run.run_id, []).append(op)
            self._cv.notify_all()
        return op.future

    def drop_run(self, run_id: str, reason: str) -> None:
        with self._cv:
            for op in self._pending.pop(run_id, []):
                op.future.set_exception(RuntimeError(reason))

    def _ready(self) -> list[Op]:
        """The next op of each run that may run now (caller holds the lock)."""
        now, out = time.monotonic(), []
        for run_id, ops in list(self._pending.items()):
            if not ops:
                del self._pending[run_id]
                continue
            run = ops[0].run
            unnumbered = [o for o in ops if o.seq_id is None]
            if unnumbered:
                out.append(unnumbered[0])
                continue
            head = min(ops, key=lambda o: o.seq_id)
            if head.seq_id <= run.next_seq or now - head.arrived >= self.gap_wait_s:
                out.append(head)
        return out

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not (ready := self._ready()):
                    self._cv.wait(timeout=0.5 if self._pending else None)
                if self._stop:
                    return
                for op in ready:
                    self._pending[op.run.run_id].remove(op)
                    if op.seq_id is not None:
                        op.run.next_seq = max(op.run.next_seq, op.seq_id + 1)
            group = [op for op in ready if op.kind == "forward_backward"]
            if group:
                self.passes += 1
                self.packed_runs_max = max(self.packed_runs_max, len(group))
                self._run(group, lambda g=group: self.pack(g))
            for op in ready:
                if op.kind != "forward_backward":
                    self._run([op], lambda op=op: [self.handlers[op.kind](op)])

    @staticmethod
    def _run(ops: list[Op], fn: Callable[[], list]) -> None:
        try:
            results = fn()
        except Exception as exc:  # noqa: BLE001 - the failure goes to the clients' futures, the loop lives on
            if not isinstance(exc, TinkerUserError):
                log.exception("tinker %s failed", ops[0].kind)
            for op in ops:
                op.future.set_exception(exc)
            return
        for op, result in zip(ops, results, strict=True):
            op.future.set_result(result)
