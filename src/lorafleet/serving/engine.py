r"""The serving engine: continuous batching over the shared base, every row with its own adapter (or none).

::

    submit() ─► inbox ─► acquire adapter (Residency) ─ready─► admit: activate slot, prefill (chunked)
                            │ cold                                │ first token sampled
                            ▼                                     ▼
                     load worker (fetch, verify,       running batch: one decode step per iteration,
                     parse) ─► RAM ─ poll() ─► ready   KV in a right-aligned slab, rows leave at any step
                                                                  │
                                      stream deltas ◄─ sample ◄───┘ ─► finish: Result, release adapter

One iteration (``step``): take new requests, collect finished loads, admit ready requests into a prefill group
(at most ``max_prefill_tokens`` padded tokens per chunk), run one prefill chunk, merge a completed group into
the batch, then one decode step for every running row. Requests join and leave at token boundaries. A request
whose adapter is cold waits for its load while everyone else keeps decoding; nothing on the decode path does
I/O. The LoRA math is the adapters' operator: rows route to ``SlotTable`` slots via ``LoraHost.route``.

Stacks: a request's adapter may be a tuple of digests (root first, e.g. organisation, team, person; at most
``MAX_LEVELS``). Each level is resident on its own (one RAM entry and one slot per digest, however many rows use
it, with a reference per row); a row routes to one slot per level (``slots: (B, L)``) and the operator sums the
levels' deltas. Rows with different stacks, single adapters and the base share the same batch.

Use it synchronously (``generate``), or start the background loop (``start``) and ``submit`` from any thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lorafleet.adapters import AdapterError, LoraAdapter, LoraHost, SlotTable, from_bytes
from lorafleet.adapters.stack import MAX_LEVELS
from lorafleet.digest import check_digest
from lorafleet.serving.chat import chat_prompt_ids
from lorafleet.serving.constrain import Constraint, GrammarCompiler, mask_logits
from lorafleet.serving.contract import adapter_levels
from lorafleet.serving.detok import TextStream
from lorafleet.serving.kv import KVSlab
from lorafleet.serving.lean import LeanDecoder, unsupported_reason
from lorafleet.serving.metrics import Metrics
from lorafleet.serving.params import EngineConfig, SamplingParams
from lorafleet.serving.residency import READY, Residency
from lorafleet.serving.sampling import request_generator, sample_rows
from lorafleet.serving.sources import Fetch

__all__ = ["Engine", "EngineConfig", "RequestError", "RequestHandle", "Result", "SamplingParams"]

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "error", "cancelled")
NONFINITE = "non-finite logits"  # the start of the error of a row whose logits became NaN/Inf
_END = object()


class RequestError(RuntimeError):
    """A request failed (its adapter could not be loaded, or the engine hit an error while serving it)."""


@dataclass
class Result:
    """A finished request. ``finish_reason`` is ``stop`` | ``length`` | ``error`` | ``cancelled``."""

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    adapter: str | None = None  # the top level's digest (the requested adapter), None = base
    stack: tuple[str, ...] = ()  # every level's digest, root first (one level for a plain adapter)
    error: str | None = None
    seed: int | None = None
    timings: dict = field(default_factory=dict)  # queued_s, ttft_s, total_s

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> Result:
        if self.error is not None:
            raise RequestError(self.error)
        return self


class RequestHandle:
    """The caller's side of a request: iterate for text deltas, ``result()`` for the final :class:`Result`.

    When the engine's loop is not running, iterating or ``result()`` drives the engine from this thread.
    """

    def __init__(self, engine: Engine, request_id: str) -> None:
        self.engine, self.id = engine, request_id
        self._deltas: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._result: Result | None = None
        self.cancelled = False

    def _put(self, delta: str) -> None:
        if delta:
            self._deltas.put(delta)

    def _finish(self, result: Result) -> None:
        self._result = result
        self._done.set()
        self._deltas.put(_END)

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating; the result's finish_reason becomes ``cancelled`` (no-op once finished)."""
        if not self._done.is_set():
            self.cancelled = True
            self.engine._cancel(self)

    def _wait(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            if not self.engine.running:
                self.engine._drive_until(self._done, deadline)
            else:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._done.wait(left if left is not None else 0.1)
            if deadline is not None and time.monotonic() >= deadline and not self._done.is_set():
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")

    def result(self, timeout: float | None = None) -> Result:
        """The final result (request errors are in ``Result.error``, not raised)."""
        self._wait(timeout)
        assert self._result is not None
        return self._result

    def __iter__(self) -> Iterator[str]:
        """Text deltas as they are generated; raises :class:`RequestError` at the end if the request failed."""
        while True:
            try:
                item = self._deltas.get(timeout=0.05 if self.engine.running else 0)
            except queue.Empty:
                if not self.engine.running:
                    self.engine.step()
                continue
            if item is _END:
                break
            yield item
        if self._result is not None and self._result.error is not None:
            raise RequestError(self._result.error)


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    levels: tuple[str, ...]  # adapter digests, root first; () = the base
    sampling: SamplingParams
    handle: RequestHandle
    seed: int
    submitted: float
    text: TextStream
    generator: torch.Generator | None = None
    constraint: Constraint | None = None  # the grammar the output is held to (SamplingParams.grammar)
    tokens: list[int] = field(default_factory=list)
    out: list[str] = field(default_factory=list)  # text deltas streamed so far
    held: list[str] = field(default_factory=list)  # digests acquired (one reference per level) and not released
    pending: set[int] = field(default_factory=set)  # residency entry ids of levels still loading
    activated: bool = False
    slots: list[int] = field(default_factory=list)  # compute slot per level
    ready_step: int = 0  # decode step count when the request became admissible
    admitted: float | None = None
    first_token: float | None = None
    done: bool = False


@dataclass(eq=False)
class _Prefill:
    """A group of joining requests, prefilled together (left-padded) in chunks, then merged into the batch."""

    reqs: list[_Request]
    ids: Tensor  # (g, P) left-padded prompt ids
    pads: Tensor  # (g,) padding columns per row
    slots: Tensor  # (g, MAX_LEVELS) compute slot per row and stack level, -1 = none
    depth: int  # most levels of any row in the group (0 = every row is base)
    slab: KVSlab
    chunk: int
    done: int = 0


class Engine:
    """Continuous-batching generation over ``base`` with per-row adapters fetched by digest.

    ``fetch(digest) -> bytes`` is the blob source (e.g. ``registry.read_blob``); nothing else about the registry
    is assumed. Thread-safe: ``submit`` from any thread while ``start()``'s loop runs.
    """

    def __init__(self, base, fetch: Fetch, config: EngineConfig | None = None) -> None:
        self.base = base
        self.config = config = config or EngineConfig()
        self.model = base.model
        self.tokenizer = base.tokenizer
        param = next(self.model.parameters())
        self.device = param.device
        want = None if config.device is None else torch.device(config.device)
        if want is not None and (want.type != self.device.type or want.index not in (None, self.device.index)):
            raise ValueError(
                    f"EngineConfig.device is {config.device!r} but the base is on {self.device}; load the base "
                f"there (load_base(..., device={config.device!r})) or leave EngineConfig.device unset"
            )
        mcfg = self.model.config
        mcfg = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
        self.host = LoraHost.attach(self.model)
        self.table = SlotTable(self.host, config.max_active, config.max_rank, dtype=param.dtype, device=self.device)
        self.metrics = Metrics()
        self._wake = threading.Event()
        self.residency = Residency(
            self.table, fetch=fetch, parse=self._parse, max_cached=config.max_cached, policy=config.cache_policy,
            protected_fraction=config.protected_fraction, load_workers=config.load_workers,
            parse_workers=config.parse_workers, max_inflight_loads=config.max_inflight_loads,
            verify_digest=config.verify_digest, metrics=self.metrics, notify=self._wake.set,
        )
        head_dim = getattr(mcfg, "head_dim", None) or mcfg.hidden_size // mcfg.num_attention_heads
        kv_heads = getattr(mcfg, "num_key_value_heads", None) or mcfg.num_attention_heads
        self._kv_shape = (mcfg.num_hidden_layers, kv_heads, head_dim)
        self.slab = KVSlab(mcfg.num_hidden_layers, config.max_batch, kv_heads, head_dim, dtype=param.dtype,
                           device=self.device)
        limit = getattr(mcfg, "max_position_embeddings", None) or 2048
        window = getattr(mcfg, "sliding_window", None)
        if window:  # the engine's masks are full-attention: stay inside the sliding window, where both agree
            limit = min(limit, window)
        self.max_seq_len = min(config.max_seq_len or limit, limit)
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self._grammars = GrammarCompiler(self.tokenizer, self.model.get_input_embeddings().num_embeddings, eos)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._lean: LeanDecoder | None = None  # the lean one-token step (serving/lean.py) where the base takes it
        if config.lean_decode:
            reason = unsupported_reason(self.model)
            if reason is None:
                self._lean = LeanDecoder.of(self.model)
            else:
                log.info("decode steps take the full transformers forward: %s", reason)

        self._ids = itertools.count(1)
        self._inbox: deque[_Request] = deque()
        self._cancels: deque[RequestHandle] = deque()
        self._inbox_lock = threading.Lock()
        self._step_lock = threading.RLock()
        self._waiting: dict[int, list[_Request]] = {}  # residency entry id -> requests waiting for its load
        self._ready: deque[_Request] = deque()  # adapter in RAM (or none): admissible
        self._ready_dirty = True
        self._group: _Prefill | None = None
        self._rows: list[_Request] = []  # row i of the slab
        self._last_tok = torch.zeros(config.max_batch, dtype=torch.long, device=self.device)  # (B,) next input
        self._slot_t = torch.full((config.max_batch, MAX_LEVELS), -1, dtype=torch.long, device=self.device)  # (B, L)
        self._at_depth = [0] * (MAX_LEVELS + 1)  # running rows by their number of adapter levels (0 = base)
        self._steps = 0  # decode steps so far
        self._join_batch = config.join_batch or max(1, config.max_batch // 4)
        self._live: dict[str, _Request] = {}
        self._purging: set[str] = set()  # digests being purged: requests for them are refused
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False

    # -- adapters --------------------------------------------------------------------------------------------

    def _parse(self, data: bytes) -> LoraAdapter:
        """Loader thread: bytes -> validated adapter that fits this base and this engine's slots."""
        adapter = from_bytes(data, self.base)
        if adapter.spec.rank > self.table.max_rank:
            raise AdapterError(
                f"adapter rank {adapter.spec.rank} exceeds EngineConfig.max_rank {self.table.max_rank}; "
                "raise max_rank to serve it"
            )
        unknown = set(adapter.weights) - set(self.table.A)
        if unknown:
            raise AdapterError(f"adapter targets modules the engine does not wrap: {sorted(unknown)[:3]}")
        return adapter

    def prefetch(self, digests: Sequence[str]) -> None:
        """Hint: load these adapters into RAM ahead of requests (if there is room)."""
        self.residency.prefetch([check_digest(d) for d in digests])

    def pin(self, digest: str) -> None:
        """Keep this adapter resident (RAM, and its slot unless no other slot can be freed)."""
        self.residency.pin(check_digest(digest))
        self._wake.set()

    def unpin(self, digest: str) -> None:
        self.residency.unpin(check_digest(digest))

    def purge(self, digest: str, timeout: float = 30.0) -> None:
        """Remove every cached copy of ``digest`` (compute slot, RAM) — e.g. after its user was forgotten.

        While the purge runs, new requests for it are refused (``finish_reason="error"``); requests already using
        it are cancelled and waited for (at most ``timeout`` s), then the residency drops it.
        """
        check_digest(digest)
        with self._inbox_lock:
            self._purging.add(digest)
        try:
            with self._step_lock:
                using = [r.handle for r in self._live.values() if digest in r.levels and not r.done]
            for handle in using:
                handle.cancel()
            deadline = time.monotonic() + timeout
            while True:
                with self._step_lock:
                    if not self.running:
                        self.step()
                    if not any(digest in r.levels and not r.done for r in self._live.values()) \
                            and self.residency.purge(digest):
                        return
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"adapter {digest[:12]} is still in use after {timeout} s; purge again")
                time.sleep(0.01)
        finally:
            with self._inbox_lock:
                self._purging.discard(digest)

    def residency_snapshot(self) -> dict:
        """What is in compute slots and in RAM right now (see :meth:`Residency.snapshot`)."""
        return self.residency.snapshot()

    residency_info = residency_snapshot

    def metrics_snapshot(self) -> dict:
        """Counters, gauges (queue depths, batch size) and latency histograms."""
        self._update_gauges()
        return self.metrics.snapshot()

    # -- requests --------------------------------------------------------------------------------------------

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = chat_prompt_ids(self.tokenizer, list(prompt))
        elif isinstance(prompt, (list, tuple)) or isinstance(prompt, Tensor):
            ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, Tensor) else prompt)]
        else:
            raise ValueError(f"prompt must be text, token ids or chat messages, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.model.get_input_embeddings().num_embeddings
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got min {min(ids)} max {max(ids)}")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"prompt has {len(ids)} tokens; at most {self.max_seq_len - 1} fit (max_seq_len)")
        return ids

    def _levels(self, adapter) -> tuple[str, ...]:
        levels = adapter_levels(adapter)
        if not levels:
            return ()
        if len(levels) > MAX_LEVELS:
            raise ValueError(f"an adapter stack has 1..{MAX_LEVELS} levels, got {len(levels)}")
        if len(set(levels)) > self.table.num_slots:
            raise ValueError(f"a stack of {len(set(levels))} adapters needs as many compute slots; this engine has "
                             f"EngineConfig.max_active={self.table.num_slots}")
        return levels

    def submit(self, prompt, adapter: str | Sequence[str] | None = None, sampling: SamplingParams | None = None, *,
               request_id: str | None = None) -> RequestHandle:
        """Queue one request; returns its handle at once. Thread-safe.

        ``prompt``: text (tokenized as is), token ids, or chat messages (``[{"role", "content"}]``, templated).
        ``adapter``: the adapter's digest (sha256 hex of its canonical bytes), a stack of digests (root first; the
        deltas of every level are summed), or None for the base.
        Bad arguments raise ``ValueError`` here; adapter problems surface in the result (``finish_reason="error"``).
        """
        if self._closed:
            raise RuntimeError("engine is closed")
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
        levels = self._levels(adapter)
        ids = self._prompt_ids(prompt)
        rid = request_id or f"req-{next(self._ids)}"
        seed = sampling.seed if sampling.seed is not None else random.SystemRandom().randrange(2**63)
        constraint = None if sampling.grammar is None else self._grammars.compile(sampling.grammar)  # GrammarError
        handle = RequestHandle(self, rid)
        req = _Request(rid, ids, levels, sampling, handle, seed, time.perf_counter(),
                       TextStream(self.tokenizer, sampling.stop), constraint=constraint)
        if not sampling.greedy:
            req.generator = request_generator(seed)
        with self._inbox_lock:
            self._inbox.append(req)
        self.metrics.inc("requests_submitted")
        self._wake.set()
        return handle

    def generate(self, prompts: Sequence, adapters: Sequence[str | Sequence[str] | None] | str | None = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Result]:
        """Submit every prompt and wait for all; ``adapters[i]`` (digest, stack of digests or None) and
        ``sampling[i]`` per prompt."""
        n = len(prompts)
        if adapters is None or isinstance(adapters, str):
            adapters = [adapters] * n
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling] * n
        if len(adapters) != n or len(sampling) != n:
            raise ValueError(f"got {n} prompts, {len(adapters)} adapters and {len(sampling)} sampling params")
        handles = [self.submit(p, a, s) for p, a, s in zip(prompts, adapters, sampling, strict=True)]
        return [h.result() for h in handles]

    def _cancel(self, handle: RequestHandle) -> None:
        with self._inbox_lock:
            self._cancels.append(handle)
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Engine:
        """Run the engine loop in a background thread (idempotent)."""
        if self._closed:
            raise RuntimeError("engine is closed")
        if not self.running:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="lorafleet-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the background loop (requests in flight stay; ``start`` or ``step`` resumes them)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stop, fail whatever is still queued or running, and shut the load workers down."""
        self.stop()
        with self._step_lock:
            self._fail_everything("engine closed")
            self._closed = True
        self.residency.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            if not self.step():
                self._wake.wait(0.05)

    def _drive_until(self, event: threading.Event, deadline: float | None) -> None:
        while not event.is_set() and not self.running:
            if deadline is not None and time.monotonic() >= deadline:
                return
            if not self.step():
                self._wake.wait(0.01)
                self._wake.clear()

    def step(self) -> bool:
        """One iteration (see the module docstring). Returns whether work remains that can progress now."""
        with self._step_lock, torch.inference_mode():
            try:
                self._intake()
                self._collect_loads()
                self._admit()
                if self._group is not None:
                    self._prefill_chunk()
                if self._rows:
                    self._decode()
            except Exception as exc:  # a bug or OOM must not hang every caller: fail what is in flight, go on
                log.exception("engine step failed")
                self._fail_everything(f"engine error: {type(exc).__name__}: {exc}")
                return False
            self._update_gauges()
            return bool(self._rows or self._group is not None or self._inbox or self._cancels
                        or self.residency.pending_results() or (self._ready and self._ready_dirty))

    # -- iteration parts -------------------------------------------------------------------------------------

    def _intake(self) -> None:
        with self._inbox_lock:
            new, self._inbox = list(self._inbox), deque()
            cancels, self._cancels = list(self._cancels), deque()
        for req in new:
            self._live[req.id] = req
            if req.handle.cancelled:
                self._finish(req, "cancelled")
            elif not req.levels:
                self._make_ready(req)
            elif self._purging.intersection(req.levels):
                gone = next(d for d in req.levels if d in self._purging)
                self._finish(req, "error", error=f"adapter {gone[:12]} was deleted")
            else:
                for digest in req.levels:
                    state, uid = self.residency.acquire(digest)
                    req.held.append(digest)
                    if state != READY and uid not in req.pending:
                        req.pending.add(uid)
                        self._waiting.setdefault(uid, []).append(req)
                if not req.pending:
                    self._make_ready(req)
        if new:
            self._ready_dirty = True
        for handle in cancels:
            req = self._live.get(handle.id)
            if req is None or req.done:
                continue
            if req in self._rows or (self._group is not None and req in self._group.reqs):
                continue  # finished at its next token (checked where tokens are produced)
            self._finish(req, "cancelled")
            for uid in req.pending:
                waiting = self._waiting.get(uid)
                if waiting and req in waiting:
                    waiting.remove(req)
            if req in self._ready:
                self._ready.remove(req)

    def _collect_loads(self) -> None:
        for digest, entry, error in self.residency.poll():
            for req in self._waiting.pop(entry, []):
                if req.done or entry not in req.pending:
                    continue
                req.pending.discard(entry)
                if error is None:
                    if not req.pending:
                        self._make_ready(req)
                else:
                    req.held = [d for d in req.held if d != digest]  # the failed entry is gone; nothing to release
                    self._finish(req, "error", error=error)

    def _make_ready(self, req: _Request) -> None:
        req.ready_step = self._steps
        self._ready.append(req)
        self._ready_dirty = True

    def _admit(self) -> None:
        """Form a prefill group from ready requests that fit the batch, a slot and the prefill budget.

        Each prefill is a pass over all the weights, as costly as a decode step when the group is small, so
        joiners are batched: they are admitted once ``join_batch`` rows are free, when nothing is running, or
        when the oldest has waited ``join_wait_steps`` decode steps.
        """
        if self._group is not None or not self._ready:
            return
        room = self.config.max_batch - len(self._rows)
        if room <= 0:
            return
        overdue = self._steps - self._ready[0].ready_step >= self.config.join_wait_steps
        if self._rows and room < min(self._join_batch, len(self._ready)) and not overdue:
            return
        if not (self._ready_dirty or overdue):
            return
        budget = self.config.max_prefill_tokens
        chosen: list[_Request] = []
        keep: deque[_Request] = deque()
        width = 0
        blocked = False
        while self._ready:
            req = self._ready.popleft()
            if req.done:
                continue
            if len(chosen) >= room or blocked:
                keep.append(req)
                continue
            w = max(width, len(req.prompt))
            if chosen and (len(chosen) + 1) * w > budget:
                keep.append(req)
                blocked = True  # first come, first served: later requests wait for the next group
                continue
            if req.levels:
                try:
                    slots = self.residency.activate_stack(req.levels)
                except AdapterError as exc:
                    self._finish(req, "error", error=f"adapter {req.levels[-1][:12]} does not fit the slot table: {exc}")
                    continue
                if slots is None:  # every slot is in use by running rows: wait for one to finish
                    keep.append(req)
                    continue
                req.activated, req.slots = True, slots
            chosen.append(req)
            width = w
        self._ready = keep
        self._ready_dirty = False
        if not chosen:
            return
        now = time.perf_counter()
        self.metrics.inc("prompt_tokens", sum(len(r.prompt) for r in chosen))
        for req in chosen:
            req.admitted = now
            self.metrics.observe("queue_wait", now - req.submitted)
        g = len(chosen)
        lens = [len(r.prompt) for r in chosen]
        ids = torch.full((g, width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(chosen):
            ids[i, width - lens[i]:] = torch.tensor(r.prompt, dtype=torch.long)
        layers, kv_heads, head_dim = self._kv_shape
        slab = KVSlab(layers, g, kv_heads, head_dim, capacity=width, dtype=self.slab.dtype, device=self.device)
        slab.count, slab.lens = g, lens
        slots = torch.full((g, MAX_LEVELS), -1, dtype=torch.long)  # (g, L)
        for i, r in enumerate(chosen):
            slots[i, : len(r.slots)] = torch.tensor(r.slots, dtype=torch.long)
        self._group = _Prefill(
            reqs=chosen, ids=ids.to(self.device), slots=slots.to(self.device),
            pads=torch.tensor([width - n for n in lens], device=self.device), slab=slab,
            chunk=max(1, budget // g), depth=max(len(r.levels) for r in chosen),
        )

    def _route(self, slots: Tensor, depth: int):
        """Route rows to ``slots[:, :depth]`` (``(B, depth)``); no table at all when no row has an adapter."""
        return self.host.route(self.table if depth else None, slots[:, :depth] if depth else None)

    def _depth(self) -> int:
        return max((d for d, n in enumerate(self._at_depth) if n), default=0)

    def _prefill_chunk(self) -> None:
        grp = self._group
        t0 = time.perf_counter()
        width = grp.ids.shape[1]
        c0, c1 = grp.done, min(width, grp.done + grp.chunk)
        mask, positions = grp.slab.prefill_chunk(c0, c1, grp.pads)
        with self._route(grp.slots, grp.depth):
            out = self.model(input_ids=grp.ids[:, c0:c1], position_ids=positions, attention_mask=mask,
                             cache=grp.slab.cache, use_cache=True, logits_to_keep=1)
        grp.slab.pos = grp.done = c1
        self.metrics.inc("prefill_chunks")
        self.metrics.observe("prefill_chunk", time.perf_counter() - t0)
        if c1 < width:
            return
        self._group = None
        self._ready_dirty = True
        tokens_t, tokens, bad = self._sample(grp.reqs, out.logits[:, -1])
        now = time.perf_counter()
        survivors = []
        for i, req in enumerate(grp.reqs):
            req.first_token = now
            self.metrics.observe("time_to_first_token", now - req.submitted)
            if bad[i]:
                self._fail_nonfinite(req)
            elif not self._on_token(req, tokens[i]):
                survivors.append(i)
        if not survivors:
            return
        r0 = self.slab.insert(grp.slab, survivors)
        idx = torch.tensor(survivors, device=self.device)
        m = len(survivors)
        self._last_tok[r0:r0 + m] = tokens_t.index_select(0, idx)
        self._slot_t[r0:r0 + m] = grp.slots.index_select(0, idx)
        for i in survivors:
            self._rows.append(grp.reqs[i])
            self._at_depth[len(grp.reqs[i].levels)] += 1

    def _decode(self) -> None:
        t0 = time.perf_counter()
        n = len(self._rows)
        mask, positions = self.slab.begin_decode()
        with self._route(self._slot_t[:n], self._depth()):
            if self._lean is not None:
                logits = self._lean(self._last_tok[:n], positions, mask, self.slab)  # (n, V)
            else:
                logits = self.model(input_ids=self._last_tok[:n, None], position_ids=positions, attention_mask=mask,
                                    cache=self.slab.cache, use_cache=True).logits[:, -1]
        self.slab.end_decode()
        tokens_t, tokens, bad = self._sample(self._rows, logits)
        self._last_tok[:n] = tokens_t
        finished = [i for i, req in enumerate(self._rows)
                    if (bad[i] and self._fail_nonfinite(req)) or (not bad[i] and self._on_token(req, tokens[i]))]
        self.metrics.inc("decode_steps")
        self._steps += 1
        if finished:
            self._remove_rows(finished)
        self.metrics.observe("decode_step", time.perf_counter() - t0)

    def _sample(self, reqs: list[_Request], logits: Tensor) -> tuple[Tensor, list[int], list[bool]]:
        """Next tokens as a device tensor (the next step's input) and as a list (for text and stop checks), and
        which rows' logits were not finite (NaN/Inf: an adapter whose weights overflow the forward pass). Those
        rows are sampled from zeros (never from NaN, which would fail the whole batch) and must be failed."""
        # a row's sum is finite iff its logits are (NaN and ±inf propagate; finite logits would need ~1e34 to
        # overflow it): one reduction instead of an elementwise test over (B, V), ~30x cheaper at 64 x 49152
        finite = torch.isfinite(logits.sum(dim=-1))  # (B,)
        bad = (~finite).tolist()
        if any(bad):
            logits = torch.where(finite[:, None], logits, torch.zeros_like(logits))
        if any(r.constraint is not None for r in reqs):  # constrained rows: only what their grammar allows
            logits, seconds = mask_logits(logits, [r.constraint for r in reqs])
            self.metrics.observe("constraint_mask", seconds)
        temps = [r.sampling.temperature for r in reqs]
        if not any(temps):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = sample_rows(logits, temps, [r.sampling.top_p for r in reqs], [r.generator for r in reqs])
        return tokens, tokens.tolist(), bad

    def _fail_nonfinite(self, req: _Request) -> bool:
        """Fail one row whose logits were NaN/Inf (the others in the batch go on); True: it finished."""
        self.metrics.inc("nonfinite_rows")
        adapter = req.levels[-1][:12] if req.levels else "none (the base)"
        self._finish(req, "error", error=f"{NONFINITE}: the model's logits became NaN/Inf for this request "
                                         f"(adapter {adapter}); its weights are corrupt or mis-scaled")
        return True

    def _on_token(self, req: _Request, token: int) -> bool:
        """Record a generated token, stream its text; returns True if the request finished."""
        req.tokens.append(token)
        self.metrics.inc("tokens_generated")
        if req.handle.cancelled:
            self._finish(req, "cancelled")
            return True
        if req.constraint is not None and not req.constraint.advance(token):
            self._finish(req, "error", error=f"constrained decoding failed: {req.constraint.error}")
            return True
        if token in self.eos_ids and not req.sampling.ignore_eos:
            self._finish(req, "stop")
            return True
        delta, stopped = req.text.push(token)
        self._emit(req, delta)
        if stopped or (req.constraint is not None and req.constraint.complete):  # a complete grammar stops too
            self._finish(req, "stop")
            return True
        if len(req.tokens) >= req.sampling.max_tokens or len(req.prompt) + len(req.tokens) >= self.max_seq_len:
            self._finish(req, "length")
            return True
        return False

    @staticmethod
    def _emit(req: _Request, delta: str) -> None:
        if delta:
            req.out.append(delta)
            req.handle._put(delta)

    def _remove_rows(self, rows: list[int]) -> None:
        for i in rows:
            self._at_depth[len(self._rows[i].levels)] -= 1
        moves = self.slab.remove(rows)
        if moves:
            src = torch.tensor([s for s, _ in moves], device=self.device)
            dst = torch.tensor([d for _, d in moves], device=self.device)
            self._last_tok.index_copy_(0, dst, self._last_tok.index_select(0, src))
            self._slot_t.index_copy_(0, dst, self._slot_t.index_select(0, src))
            for s, d in moves:
                self._rows[d] = self._rows[s]
        del self._rows[self.slab.count:]
        self._ready_dirty = True

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        if req.done:
            return
        req.done = True
        if reason not in ("error", "cancelled") or req.tokens:
            self._emit(req, req.text.flush())
        if req.activated:
            for digest in req.levels:
                self.residency.deactivate(digest)
            req.activated = False
        for digest in req.held:
            self.residency.release(digest)
        req.held = []
        now = time.perf_counter()
        text = "".join(req.out)
        result = Result(
            request_id=req.id, text=text, token_ids=list(req.tokens), prompt_tokens=len(req.prompt),
            completion_tokens=len(req.tokens), finish_reason=reason, adapter=req.levels[-1] if req.levels else None,
            stack=req.levels, error=error, seed=req.seed,
            timings={
                "queued_s": None if req.admitted is None else req.admitted - req.submitted,
                "ttft_s": None if req.first_token is None else req.first_token - req.submitted,
                "total_s": now - req.submitted,
            },
        )
        self._live.pop(req.id, None)
        counter = {"error": "requests_failed", "cancelled": "requests_cancelled"}.get(reason, "requests_finished")
        self.metrics.inc(counter)
        req.handle._finish(result)
        self._ready_dirty = True

    def _fail_everything(self, message: str) -> None:
        for req in list(self._live.values()):
            self._finish(req, "error", error=message)
        with self._inbox_lock:
            stranded, self._inbox = list(self._inbox), deque()
        for req in stranded:
            self._finish(req, "error", error=message)
        self._rows, self._group, self._ready, self._waiting = [], None, deque(), {}
        self._at_depth = [0] * (MAX_LEVELS + 1)
        self.slab.reset()

    def _update_gauges(self) -> None:
        counts = self.residency.counts()
        self.metrics.set_gauges(
            running=len(self._rows),
            prefilling=0 if self._group is None else len(self._group.reqs),
            queue_ready=len(self._ready),
            queue_loading=len({id(r) for v in self._waiting.values() for r in v if not r.done}),  # a stack waits on several
            inbox=len(self._inbox),
            adapters_in_ram=counts["ram"],
            adapters_loading=counts["loading"],
            adapters_queued=counts["queued"],
            slots_used=counts["slots_used"],
            kv_capacity_columns=self.slab.capacity,
            kv_bytes=self.slab.nbytes,
        )
