"""In-memory state of the Tinker service: sessions, training runs, sampler sessions, futures.

Kept in process memory on purpose (a server restart ends every session, as on Tinker itself when a session's
heartbeat lapses). What outlives the process: sampler checkpoints are registry revisions; training-state
checkpoints (``save_state``) are safetensors files under ``$LORAFLEET_HOME/tinker/``, found again by path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch

from lorafleet.adapters import LoraAdapter

MAX_FUTURES = 4096  # finished futures kept for (re)retrieval; the oldest finished ones go first


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class TinkerUserError(ValueError):
    """A request the client must fix; answered as a user error naming the problem (never retried)."""


class TinkerNotFoundError(LookupError):
    """A run, checkpoint, session or sampler that does not exist for this key (404)."""


@dataclass
class Session:
    """One SDK session (``ServiceClient``): whose it is, and what ``search_sessions`` matches on."""

    session_id: str
    tenant: str | None  # None: an admin key's session
    owner: str  # the key that created it ("tinker:<key prefix>")
    user_metadata: dict[str, str] = field(default_factory=dict)
    display_name: str | None = None
    created: datetime = field(default_factory=utcnow)
    finished: str | None = None  # the client's finish reason ("success", "errored", "interrupted")

    def status(self) -> dict:
        if self.finished is None:
            return {"type": "active"}
        return {"type": "client_finished", "reason": {"type": self.finished}}


@dataclass
class Checkpoint:
    checkpoint_id: str  # "weights/<name>" or "sampler_weights/<name>"
    kind: str  # "training" | "sampler"
    tinker_path: str
    time: datetime
    size_bytes: int
    revision: int | None = None  # sampler checkpoints: the registry revision number
    digest: str | None = None
    file: str | None = None  # training checkpoints: the safetensors file
    user_metadata: dict[str, str] = field(default_factory=dict)  # the client's, given at save time

    def to_dict(self) -> dict:
        ours = ({"lorafleet_revision": str(self.revision), "lorafleet_digest": self.digest}
                if self.revision is not None else {})
        meta = dict(self.user_metadata) | ours
        return {"checkpoint_id": self.checkpoint_id, "checkpoint_type": self.kind, "time": self.time.isoformat(),
                "tinker_path": self.tinker_path, "size_bytes": self.size_bytes, "public": False,
                "user_metadata": meta or None}


@dataclass
class Run:
    """One training client's model: a LoRA adapter being trained, its optimizer, and its history."""

    run_id: str
    session_id: str
    tenant: str
    ref: str  # the registry adapter "tenant/user/name" its sampler checkpoints become revisions of
    creator: str
    adapter: LoraAdapter  # tensors are trainable leaves
    optimizer: torch.optim.Optimizer
    user_metadata: dict
    created: datetime = field(default_factory=utcnow)
    last_request: datetime = field(default_factory=utcnow)
    steps: int = 0  # optimizer steps taken
    datums: int = 0  # datums seen by forward_backward (not forward-only)
    tokens: int = 0  # weighted target tokens seen
    loss_fns: set = field(default_factory=set)
    loss_configs: dict = field(default_factory=dict)  # loss_fn -> the loss_fn_config it last trained with
    last_adam: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)  # per forward_backward: weighted mean token loss
    pending_grad: bool = False
    unembed_requested: bool = False  # recorded; lorafleet adapts attention/MLP projections only
    next_seq: int = 1
    last_revision: int | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    forgotten: bool = False  # its user was forgotten: nothing more of it may be persisted
    ephemeral_digests: set = field(default_factory=set)  # blobs of save_weights_and_get_sampling_client

    def params(self) -> list[torch.Tensor]:
        return [t for ab in self.adapter.weights.values() for t in ab]

    def checkpoint(self, kind: str, name: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.kind == kind and c.checkpoint_id.endswith("/" + name)), None)

    def to_dict(self) -> dict:
        last = {k: next((c.to_dict() for c in reversed(self.checkpoints) if c.kind == k), None)
                for k in ("training", "sampler")}
        return {"training_run_id": self.run_id, "base_model": self.adapter.base_name or "", "model_owner": self.creator,
                "is_lora": True, "corrupted": False, "lora_rank": self.adapter.spec.rank,
                "last_request_time": self.last_request.isoformat(), "last_checkpoint": last["training"],
                "last_sampler_checkpoint": last["sampler"],
                "user_metadata": {str(k): str(v) for k, v in self.user_metadata.items()} | {"lorafleet_adapter": self.ref}}


@dataclass
class SamplerSession:
    sampler_id: str
    tenant: str | None  # None: the base (anyone may sample it)
    base_model: str
    model_path: str | None
    digest: str | None  # the adapter blob the engine loads; None = the base alone
    ref: str | None = None  # the adapter "tenant/user/name" it samples (None: the base)
    session_id: str | None = None  # the SDK session that created it


@dataclass
class Pending:
    """A request the client polls with retrieve_future."""

    future: concurrent.futures.Future
    tenant: str | None
    proto: bool  # the result is protobuf bytes (forward_backward, sample), else a JSON dict
    created: float = field(default_factory=time.monotonic)


class FutureStore:
    """request_id -> :class:`Pending`; thread-safe. Results stay retrievable until evicted (LRU of finished)."""

    def __init__(self, max_entries: int = MAX_FUTURES) -> None:
        self._items: OrderedDict[str, Pending] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def add(self, future: concurrent.futures.Future, *, tenant: str | None, proto: bool) -> str:
        request_id = new_id("req")
        with self._lock:
            self._items[request_id] = Pending(future, tenant, proto)
            if len(self._items) > self.max_entries:
                for rid in [r for r, p in self._items.items() if p.future.done()][: len(self._items) - self.max_entries]:
                    del self._items[rid]
        return request_id

    def done(self, value, *, tenant: str | None, proto: bool = False) -> str:
        """A future that is already resolved (cheap requests answered at once, still through the future API)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(value)
        return self.add(fut, tenant=tenant, proto=proto)

    def get(self, request_id: str) -> Pending | None:
        with self._lock:
            return self._items.get(request_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def drop(self, futures: set) -> int:
        """Forget the entries of these futures (results included), cancelling those still pending."""
        with self._lock:
            doomed = [rid for rid, p in self._items.items() if p.future in futures]
            for rid in doomed:
                self._items.pop(rid).future.cancel()
        return len(doomed)


async def wait_for(future: concurrent.futures.Future, timeout: float) -> bool:
    """Wait up to ``timeout`` s for a thread-side future without cancelling it on timeout; True if done."""
    if future.done():
        return True
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
    except TimeoutError:
        return False
    except Exception:  # noqa: BLE001 - the failure is read from the future itself
        return True
    return True
