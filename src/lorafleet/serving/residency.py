r"""Where each adapter lives, keyed by digest: compute slot, host RAM, or cold (the blob source).

::

    cold (fetch(digest) -> bytes) ──load worker: fetch, verify sha256, parse, validate──► RAM entry
    RAM entry ──activate (copy into a SlotTable slot, engine thread)──► compute slot ──► rows route here

* **Entries** are ``QUEUED`` (wanted, no RAM reserved yet), ``LOADING`` (a worker has it; one RAM entry
  reserved) or ``READY`` (deserialized, in RAM, maybe also in a slot). ``len(READY + LOADING) <= max_cached``.
* **References.** A request holds its adapter's entry from submit to finish (``acquire`` / ``release``); an
  in-flight row also holds its slot (``activate`` / ``deactivate``). Referenced entries are never evicted,
  from RAM or from their slot.
* **Stacks.** A request for a stack holds one reference per level (``activate_stack`` takes every level's slot
  or none). A level shared by many rows (an organisation's adapter) is one entry and one slot, counted once in
  RAM and slot bytes, with ``refs`` / ``active`` = the rows using it: it is not evictable while any row uses it,
  and each row's use is a touch, so a shared level sits in SLRU's protected segment while the personal levels
  around it churn through probation.
* **RAM policy.** Segmented LRU (Karedla et al. 1994): new entries enter a *probation* segment; a second use
  promotes to *protected* (``protected_fraction`` of the capacity; its overflow drops back to probation).
  Eviction takes probation's LRU end first, so a scan of one-off adapters only churns probation and the
  regulars in protected survive. ``cache_policy="lru"`` is the plain LRU baseline.
* **Slot policy.** LRU among unreferenced slot residents, pinned adapters last.
* **Exclusive tiers.** An adapter in a slot is not also kept as a RAM copy (for 128 active rank-8 adapters on
  SmolLM2 that halves the memory); if its slot is reused while it stays cached, it is copied back out first.
* **Pinning** keeps an adapter in RAM (never evicted) and in its slot unless no other slot can be freed.
* **Loads never block decoding**: a worker fetches (``load_workers`` concurrent fetches hide store latency),
  verifies and parses (at most ``parse_workers`` at once: that part is CPU-bound and takes a core from
  decoding), then, under the lock, makes the entry READY and starts the next queued load, so load throughput
  does not depend on the engine's step rate. The engine thread learns which loads finished (``poll``) between
  steps. A failed load (missing or corrupt blob,
  bad adapter, wrong base) drops the entry and is reported with the entry's id, so exactly the requests waiting
  for that attempt fail.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lorafleet.adapters import LoraAdapter, LoraSpec, SlotTable
from lorafleet.digest import digest_of
from lorafleet.serving.metrics import Metrics

log = logging.getLogger(__name__)

QUEUED, LOADING, READY = "queued", "loading", "ready"
# Load workers run at a lower OS priority (Linux: per-thread nice) so that on a busy machine the decode
# thread gets the CPU first; loads are off the critical path by design.
LOADER_NICE = 10


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


class LRUPolicy:
    """Plain LRU order over RAM entries (the baseline)."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        self.order: OrderedDict[str, None] = OrderedDict()

    def insert(self, key: str) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def touch(self, key: str) -> None:
        if key in self.order:
            self.order.move_to_end(key)

    def remove(self, key: str) -> None:
        self.order.pop(key, None)

    def victims(self) -> Iterator[str]:
        """Keys in eviction order (first = evict first)."""
        return iter(list(self.order))

    def segment(self, key: str) -> str:
        return "lru"


class SLRUPolicy:
    """Segmented LRU: probation (seen once) and protected (seen again); probation is evicted first."""

    name = "slru"

    def __init__(self, capacity: int, protected_fraction: float = 0.8) -> None:
        self.protected_cap = max(1, int(capacity * protected_fraction))
        self.probation: OrderedDict[str, None] = OrderedDict()
        self.protected: OrderedDict[str, None] = OrderedDict()

    def insert(self, key: str) -> None:
        self.protected.pop(key, None)
        self.probation[key] = None
        self.probation.move_to_end(key)

    def touch(self, key: str) -> None:
        if key in self.protected:
            self.protected.move_to_end(key)
        elif key in self.probation:
            del self.probation[key]
            self.protected[key] = None
            while len(self.protected) > self.protected_cap:  # demote the protected LRU to probation's MRU end
                old, _ = self.protected.popitem(last=False)
                self.probation[old] = None

    def remove(self, key: str) -> None:
        self.probation.pop(key, None)
        self.protected.pop(key, None)

    def victims(self) -> Iterator[str]:
        return iter([*self.probation, *self.protected])

    def segment(self, key: str) -> str:
        return "protected" if key in self.protected else "probation"


def make_policy(name: str, capacity: int, protected_fraction: float = 0.8):
    if name == "slru":
        return SLRUPolicy(capacity, protected_fraction)
    if name == "lru":
        return LRUPolicy(capacity)
    raise ValueError(f"unknown cache policy {name!r}; use 'slru' or 'lru'")


class AdapterLoadError(RuntimeError):
    """An adapter could not be made ready (missing, corrupt, invalid, or made for another base)."""


_uids = itertools.count(1)


@dataclass(eq=False)
class _Entry:
    digest: str
    state: str
    uid: int = 0  # this entry's identity: a failed load's waiters are told apart from a later retry's
    adapter: LoraAdapter | None = None
    refs: int = 0  # requests holding it, waiting or in flight
    active: int = 0  # in-flight rows routed to its slot
    slot: int | None = None
    pinned: bool = False
    hinted: bool = False  # loaded by a prefetch hint and not used since
    nbytes: int = 0
    spec: LoraSpec | None = None  # kept to copy the adapter back out of its slot
    modules: tuple[str, ...] = ()


class Residency:
    """Three-tier residency of adapters by digest. Thread-safe; ``activate``/``poll`` run on the engine thread.

    ``fetch(digest) -> bytes`` reads a blob; ``parse(bytes) -> LoraAdapter`` validates it (raising on a bad one);
    ``notify()`` is called from a worker thread when a load finishes (the engine's wake-up).
    """

    def __init__(self, table: SlotTable, *, fetch: Callable[[str], bytes], parse: Callable[[bytes], LoraAdapter],
                 max_cached: int, policy: str = "slru", protected_fraction: float = 0.8, load_workers: int = 4,
                 parse_workers: int = 1, max_inflight_loads: int = 4, verify_digest: bool = True,
                 metrics: Metrics | None = None, notify: Callable[[], None] | None = None) -> None:
        self.table = table
        self.max_active = table.num_slots
        self.max_cached = max_cached
        self.max_inflight = max_inflight_loads
        self.verify_digest = verify_digest
        self.policy = make_policy(policy, max_cached, protected_fraction)
        self.metrics = metrics or Metrics()
        self._fetch, self._parse, self._notify = fetch, parse, notify or (lambda: None)
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._queue: deque[str] = deque()  # QUEUED digests, FIFO
        self._done: list[tuple[str, int, str | None]] = []
        self._inflight = 0
        self._resident = 0  # entries LOADING or READY (what max_cached bounds)
        self._slot_owner: list[str | None] = [None] * table.num_slots
        self._slot_lru: OrderedDict[str, None] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="lorafleet-load",
                                        initializer=_lower_priority)
        self._parse_slots = threading.Semaphore(parse_workers)  # CPU-bound part: verify + parse
        self._closed = False

    # -- requests --------------------------------------------------------------------------------------------

    def _new_entry(self, digest: str, **kw) -> _Entry:
        e = self._entries[digest] = _Entry(digest, QUEUED, uid=next(_uids), **kw)
        self._queue.append(digest)
        return e

    def acquire(self, digest: str) -> tuple[str, int]:
        """A request wants ``digest``: ``(READY | LOADING | QUEUED, entry id)``; wait for ``poll`` unless READY."""
        with self._lock:
            e = self._entries.get(digest)
            if e is None:
                e = self._new_entry(digest)
                self.metrics.inc("misses")
                e.refs += 1
                self._pump()
                return e.state, e.uid
            e.refs += 1
            if e.state != READY:
                self.metrics.inc("misses")
                self.metrics.inc("coalesced")
                return e.state, e.uid
            self.metrics.inc("hits_slot" if e.slot is not None else "hits_ram")
            if e.hinted:
                e.hinted = False  # the first use of a prefetched adapter is not a repeat use
            else:
                self.policy.touch(digest)
            return READY, e.uid

    def release(self, digest: str) -> None:
        """The request holding ``digest`` is done (finished, failed or cancelled)."""
        with self._lock:
            e = self._entries.get(digest)
            if e is None:
                return
            e.refs -= 1
            if e.refs == 0 and e.state == QUEUED and not (e.pinned or e.hinted):
                del self._entries[digest]  # nobody wants it any more; its queue item is skipped
            self._pump()

    def state(self, digest: str) -> str | None:
        with self._lock:
            e = self._entries.get(digest)
            return None if e is None else e.state

    def activate(self, digest: str) -> int | None:
        """Put a READY adapter in a compute slot for one more in-flight row; ``None`` if every slot is busy.

        Raises ``AdapterError`` if the slot table refuses it (then nothing changed).
        """
        with self._lock:
            e = self._entries[digest]
            if e.state != READY:
                raise RuntimeError(f"adapter {digest[:12]} is {e.state}, not ready")
            if e.slot is not None:
                e.active += 1
                self._slot_lru.move_to_end(digest)
                return e.slot
            slot = self._free_slot()
            if slot is None:
                return None
            t0 = time.perf_counter()
            try:
                self.table.load(slot, e.adapter)
            except Exception:
                self.table.clear(slot)
                raise
            self.metrics.observe("slot_load_latency", time.perf_counter() - t0)
            self.metrics.inc("slot_loads")
            e.adapter = None  # exclusive: the slot now holds the only copy
            e.slot, e.active = slot, e.active + 1
            self._slot_owner[slot] = digest
            self._slot_lru[digest] = None
            return slot

    def activate_stack(self, digests) -> list[int] | None:
        """Slots for every level of one row's stack (root first), all or none: ``None`` (and nothing held) when
        they cannot all be had now. Levels already in a slot are claimed first, so filling a free slot for
        one level never evicts another level of the same row. Raises ``AdapterError`` like :meth:`activate`."""
        with self._lock:
            order = sorted(digests, key=lambda d: self._entries[d].slot is None)
            claimed: list[str] = []
            try:
                for d in order:
                    if self.activate(d) is None:
                        break
                    claimed.append(d)
            finally:
                if len(claimed) < len(order):
                    for d in claimed:
                        self.deactivate(d)
            if len(claimed) < len(order):
                return None
            return [self._entries[d].slot for d in digests]

    def deactivate(self, digest: str) -> None:
        with self._lock:
            e = self._entries.get(digest)
            if e is not None and e.active > 0:
                e.active -= 1

    def _free_slot(self) -> int | None:
        for slot, owner in enumerate(self._slot_owner):
            if owner is None:
                return slot
        for want_pinned in (False, True):
            for d in self._slot_lru:
                e = self._entries[d]
                if e.active == 0 and e.pinned == want_pinned:
                    slot = e.slot
                    e.adapter = self._copy_out(e)  # it stays cached in RAM
                    self._drop_slot(e)
                    self.metrics.inc("evictions_slot")
                    return slot
        return None

    def _copy_out(self, e: _Entry) -> LoraAdapter:
        """The adapter in ``e``'s slot, back as a host-RAM ``LoraAdapter`` (what ``table.load`` put in)."""
        r, slot, A, B = e.spec.rank, e.slot, self.table.A, self.table.B
        weights = {n: (A[n][slot, :r].to("cpu", copy=True), B[n][slot, :, :r].to("cpu", copy=True)) for n in e.modules}
        return LoraAdapter(spec=e.spec, weights=weights)

    def _drop_slot(self, e: _Entry) -> None:
        if e.slot is not None:
            self._slot_owner[e.slot] = None
            self._slot_lru.pop(e.digest, None)
            e.slot = None

    # -- hints -----------------------------------------------------------------------------------------------

    def prefetch(self, digests) -> None:
        """Start loading these adapters into RAM if there is room (a hint: nothing waits for it)."""
        with self._lock:
            for d in digests:
                if d not in self._entries:
                    self._new_entry(d, hinted=True)
                    self.metrics.inc("prefetches")
            self._pump()

    def pin(self, digest: str) -> None:
        """Keep ``digest`` in RAM for good (loading it if cold). At most ``max_cached - max_active`` pins."""
        with self._lock:
            e = self._entries.get(digest)
            if e is not None and e.pinned:
                return
            pinned = sum(x.pinned for x in self._entries.values())
            if pinned + 1 > self.max_cached - self.max_active:
                raise ValueError(
                    f"cannot pin {digest[:12]}: {pinned} adapters are pinned and at most max_cached - max_active = "
                    f"{self.max_cached - self.max_active} may be (so every slot can always be filled); raise "
                    "EngineConfig.max_cached or unpin one"
                )
            if e is None:
                e = self._new_entry(digest)
            e.pinned = True
            self._pump()

    def unpin(self, digest: str) -> None:
        with self._lock:
            e = self._entries.get(digest)
            if e is not None:
                e.pinned = False
                if e.state == QUEUED and e.refs == 0 and not e.hinted:
                    del self._entries[digest]

    def purge(self, digest: str) -> bool:
        """Drop ``digest`` from every tier: its compute slot is zeroed, its RAM copy and pin released, a queued or
        running load discarded. Refused (``False``, nothing changed) while a request still holds it; ``True`` when
        nothing of it remains (also when it was never here). The blob itself is the caller's business."""
        with self._lock:
            e = self._entries.get(digest)
            if e is None:
                return True
            if e.refs or e.active:
                return False
            if e.slot is not None:
                self.table.clear(e.slot)  # zero the weights: nothing of it stays readable in the slot table
                self._drop_slot(e)
            e.adapter, e.pinned, e.hinted = None, False, False
            del self._entries[digest]
            self.policy.remove(digest)
            if e.state == READY:
                self._resident -= 1
            # QUEUED: its queue item is skipped as stale. LOADING: the worker finds the entry gone, frees its
            # reservation and drops what it parsed.
            self.metrics.inc("purges")
            return True

    # -- loading ---------------------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start queued loads while workers and RAM room (free, or an evictable entry) allow."""
        while self._queue and self._inflight < self.max_inflight and not self._closed:
            d = self._queue[0]
            e = self._entries.get(d)
            if e is None or e.state != QUEUED:
                self._queue.popleft()  # stale: released, failed or already loaded
                continue
            if self._resident >= self.max_cached and not self._evict_one():
                return
            self._queue.popleft()
            e.state = LOADING
            self._inflight += 1
            self._resident += 1
            self._pool.submit(self._load, d, e.uid)

    def _evict_one(self) -> bool:
        for d in self.policy.victims():
            e = self._entries[d]
            if e.refs == 0 and e.active == 0 and not e.pinned:
                self._drop_slot(e)
                del self._entries[d]
                self.policy.remove(d)
                self._resident -= 1
                self.metrics.inc("evictions_ram")
                return True
        return False

    def _load(self, digest: str, uid: int) -> None:
        """Worker thread: fetch, verify, parse, validate, then finish the entry. Never raises."""
        t0 = time.perf_counter()
        adapter, error = None, None
        try:
            data = self._fetch(digest)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"fetch returned {type(data).__name__}, expected bytes")
            with self._parse_slots:
                if self.verify_digest:
                    actual = digest_of(data)
                    if actual != digest:
                        raise AdapterLoadError(f"blob is corrupt: its sha256 is {actual[:12]}…, not the digest")
                adapter = self._parse(bytes(data))
        except Exception as exc:  # any failure is this adapter's alone
            error = f"adapter {digest[:12]} could not be loaded: {type(exc).__name__}: {exc}"
            log.warning("%s", error)
        with self._lock:
            self._inflight -= 1
            e = self._entries.get(digest)
            if e is None or e.uid != uid:  # cannot happen (LOADING entries are only removed here); be safe
                self._resident -= 1
                error = error or "adapter entry vanished while loading"
            elif error is not None:
                del self._entries[digest]
                self._resident -= 1
            else:
                e.state, e.adapter, e.nbytes = READY, adapter, adapter.num_bytes
                e.spec, e.modules = adapter.spec, tuple(adapter.weights)
                self.policy.insert(digest)
            if error is None:
                self.metrics.inc("loads_ok")
                self.metrics.observe("load_latency", time.perf_counter() - t0)
            else:
                self.metrics.inc("load_failures")
            self._done.append((digest, uid, error))
            self._pump()
        self._notify()

    def pending_results(self) -> bool:
        with self._lock:
            return bool(self._done)

    def poll(self) -> list[tuple[str, int, str | None]]:
        """Loads finished since the last poll: ``(digest, entry id, None)`` ready, or ``(..., error)``."""
        with self._lock:
            done, self._done = self._done, []
            return done

    # -- introspection ---------------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """What is where: slots, RAM entries (with segment, refs, pins), loads in progress, queue depth."""
        with self._lock:
            ram = [
                {"digest": e.digest, "slot": e.slot, "refs": e.refs, "active": e.active, "pinned": e.pinned,
                 "segment": self.policy.segment(e.digest), "bytes": e.nbytes, "in_ram": e.adapter is not None}
                for e in self._entries.values() if e.state == READY
            ]
            return {
                "slots": [{"slot": s, "digest": d, "active": self._entries[d].active if d else 0}
                          for s, d in enumerate(self._slot_owner)],
                "ram": ram,
                "ram_bytes": sum(r["bytes"] for r in ram if r["in_ram"]),  # slot residents are not duplicated
                "slot_table_bytes": self.table.nbytes,
                "loading": [e.digest for e in self._entries.values() if e.state == LOADING],
                "queued": sum(1 for e in self._entries.values() if e.state == QUEUED),
                "max_active": self.max_active,
                "max_cached": self.max_cached,
                "policy": self.policy.name,
            }

    def counts(self) -> dict[str, int]:
        with self._lock:
            states = [e.state for e in self._entries.values()]
            return {"ram": states.count(READY), "loading": states.count(LOADING), "queued": states.count(QUEUED),
                    "slots_used": sum(o is not None for o in self._slot_owner)}

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
