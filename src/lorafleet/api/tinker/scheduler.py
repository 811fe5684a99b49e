"""The order in which clients' training requests run on the shared base, one thread for all of them.

Each run's requests execute in ``seq_id`` order (the SDK numbers a training client's forward_backward,
optim_step and save calls with one counter, and sends large batches as parallel chunks). A gap that is not
filled within ``gap_wait_s`` is skipped, so a lost request cannot wedge a run.

Multi-tenancy: every pass takes the next ready request of *each* run; all forward_backward requests among
them — different clients, different adapters, different ranks — go through one packed forward/backward on
the resident base (the trainer's operator + :class:`~lorafleet.adapters.StackedWeights`), so N clients
share one pass instead of queueing N. Each adapter only receives the gradient of its own rows.

Cheap requests (optim_step, saves) run first; before a forward/backward pass, the scheduler waits up to
``pack_wait_s`` for runs that were just served and have nothing queued — a client that got its optim_step
result is about to send its next forward_backward, and waiting a moment lets it join the pass instead of
falling one pass out of step with the others for good.
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
                 gap_wait_s: float = 5.0, pack_wait_s: float = 0.2, recent_s: float = 2.0) -> None:
        self.pack, self.handlers, self.gap_wait_s = pack, handlers, gap_wait_s
        self.pack_wait_s, self.recent_s = pack_wait_s, recent_s
        self._pending: dict[str, list[Op]] = {}  # run_id -> ops not yet run
        self._served: dict[str, float] = {}  # run_id -> when its last op finished
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
                cheap = [op for op in ready if op.kind != "forward_backward"]
                if not cheap:
                    ready = self._gather(ready)
                for op in cheap or ready:
                    self._pending[op.run.run_id].remove(op)
                    if op.seq_id is not None:
                        op.run.next_seq = max(op.run.next_seq, op.seq_id + 1)
            if cheap:
                for op in cheap:
                    self._run([op], lambda op=op: [self.handlers[op.kind](op)])
                continue
            self.passes += 1
            self.packed_runs_max = max(self.packed_runs_max, len(ready))
            self._run(ready, lambda g=ready: self.pack(g))

    def _gather(self, ready: list[Op]) -> list[Op]:
        """Wait up to ``pack_wait_s`` for just-served idle runs to queue their next op (caller holds the lock)."""
        now = time.monotonic()
        expected = [rid for rid, t in self._served.items() if now - t < self.recent_s and not self._pending.get(rid)
                    and rid not in {op.run.run_id for op in ready}]
        if not expected or self.pack_wait_s <= 0:
            return ready
        end = now + self.pack_wait_s
        while not self._stop and time.monotonic() < end and not all(self._pending.get(r) for r in expected):
            self._cv.wait(end - time.monotonic())
        again = self._ready()
        return [op for op in again if op.kind == "forward_backward"] or ready

    def _run(self, ops: list[Op], fn: Callable[[], list]) -> None:
        try:
            results = fn()
        except Exception as exc:  # noqa: BLE001 - the failure goes to the clients' futures, the loop lives on
            if not isinstance(exc, TinkerUserError):
                log.exception("tinker %s failed", ops[0].kind)
            results = [exc] * len(ops)
        with self._cv:
            now = time.monotonic()
            for op in ops:
                self._served[op.run.run_id] = now
            for rid in [r for r, t in self._served.items() if now - t > self.recent_s]:
                del self._served[rid]
        for op, result in zip(ops, results, strict=True):
            if isinstance(result, Exception):
                op.future.set_exception(result)
            else:
                op.future.set_result(result)
