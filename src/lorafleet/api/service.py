"""What the HTTP app serves from: the registry, the resident base, the engine, keys, jobs, limits."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from lorafleet.adapters import LoraAdapter, from_bytes, peft_io, to_bytes
from lorafleet.api.errors import ApiError
from lorafleet.api.keys import KeyStore
from lorafleet.api.metrics import RequestCounter
from lorafleet.continual.schedule import Scheduler
from lorafleet.digest import digest_of
from lorafleet.registry import NotFoundError, Provenance, Registry, imports
from lorafleet.registry.memory import MemoryStore
from lorafleet.registry.registry import same_or_conflict
from lorafleet.serving.contract import EngineLike
from lorafleet.training.jobs import JobQueue
from lorafleet.training.worker import Worker

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Limits:
    """Request limits of the HTTP service."""

    max_upload_bytes: int = 64 * 1024 * 1024  # an adapter upload (POST …/revisions), counted as it arrives
    max_body_bytes: int = 4 * 1024 * 1024  # any other request body (chat, jobs, feedback, Tinker), counted likewise
    max_tokens: int = 1024  # completion tokens per sequence (OpenAI max_tokens, Tinker sampling_params.max_tokens)
    max_prompt_tokens: int = 4096  # prompt tokens, after the chat template (OpenAI routes and Tinker asample)
    max_prompt_chars: int = 65_536  # prompt characters, checked before any tokenizer runs
    max_samples: int = 16  # sequences per Tinker asample (num_samples); the OpenAI routes take n = 1


class Service:
    """Holds the long-lived parts of a server process; the app reads them from ``app.state.service``."""

    def __init__(self, registry: Registry, base, engine: EngineLike | None = None, *, limits: Limits | None = None,
                 run_worker: bool = False, metrics_public: bool = False) -> None:
        self.registry = registry
        self.metrics_public = metrics_public  # /metrics without a key; by default it needs an admin key
        self.base = base
        self.engine = engine
        self.limits = limits or Limits()
        self.keys = KeyStore(registry)
        self.jobs = JobQueue(registry)
        self.memory = MemoryStore(registry)  # captured conversations, feedback, update schedules
        self.requests = RequestCounter()
        self.run_worker = run_worker
        self._worker_stop = threading.Event()
        self._worker_thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self.engine is not None:
            self.engine.start()
        if self.run_worker:
            scheduler = Scheduler(self.registry, self.base, memory=self.memory, min_interval_s=5.0)
            worker = Worker(self.registry, self.base, hooks=[scheduler.tick])
            self._worker_thread = threading.Thread(
                target=worker.run, kwargs={"until_idle": False, "stop": self._worker_stop}, name="lorafleet-worker",
                daemon=True)
            self._worker_thread.start()

    def stop(self) -> None:
        self._worker_stop.set()
        if self._worker_thread is not None:
            self._worker_thread.join(timeout=60)
        if self.engine is not None:
            self.engine.stop()

    # ---------------------------------------------------------------- uploads

    def _check_base(self, declared: str | None) -> None:
        if declared is not None and declared != self.base.fingerprint:
            raise ApiError(422, f"the adapter was made for base {declared[:16]}…, but this server's base is "
                                f"{self.base.name} ({self.base.fingerprint[:16]}…); nothing was committed",
                           code="base_mismatch", param="base_fingerprint")

    def validate_peft_files(self, files: dict[str, bytes], base_fingerprint: str | None) -> LoraAdapter:
        """Validate a multipart PEFT upload: the files of a folder as ``peft.save_pretrained`` writes it.

        The same check as every other way in (:func:`lorafleet.adapters.peft_io.parse_peft`); files other than
        adapter_config.json / adapter_model.safetensors (README.md, ...) are ignored, listed in ``meta["ignored"]``.
        """
        self._check_base(base_fingerprint)
        if not files:
            raise ApiError(400, "no file uploaded: send adapter_config.json and adapter_model.safetensors as "
                                "multipart files", code="invalid_upload")
        named: dict[str, bytes] = {}
        for filename, data in files.items():
            name = Path(filename).name  # a file name, never a path
            if len(data) > self.limits.max_upload_bytes:
                raise ApiError(413, f"{name} is over the limit of {self.limits.max_upload_bytes} bytes",
                               code="too_large")
            named[name] = data
        ignored = peft_io.peft_folder_files(named, "the upload")
        adapter = peft_io.parse_peft(named[peft_io.CONFIG_FILE], named[peft_io.WEIGHTS_FILE], self.base,
                                     max_bytes=self.limits.max_upload_bytes, where="the upload")
        adapter.meta["ignored"] = ignored
        return adapter

    def validate_blob(self, body: bytes, base_fingerprint: str | None) -> LoraAdapter:
        """Validate a raw body: lorafleet canonical adapter bytes (safetensors with the spec in its metadata)."""
        self._check_base(base_fingerprint)
        if not body:
            raise ApiError(400, "empty upload body", code="invalid_upload")
        return from_bytes(body, self.base, max_bytes=self.limits.max_upload_bytes)

    def commit_uploaded(self, ref: str, adapter: LoraAdapter, *, creator: str, alias: str,
                        idempotency_key: str | None = None):
        """Commit an upload; returns ``(revision, replayed)``. With an ``Idempotency-Key`` (scope: the ref's
        tenant) a retry of the same content returns the revision the first attempt made (``replayed``), other
        content under the same key is refused (``KeyConflictError``, 409); the key is stored in the commit's
        transaction, so it holds across restarts and a crash between commit and response."""
        blob = to_bytes(adapter)
        key = (f"upload:{ref.split('/')[0]}", idempotency_key) if idempotency_key is not None else None
        if key is not None:
            done = self.registry.keyed(*key)
            if done is not None:
                same_or_conflict(key, done, ref, digest_of(blob))
                return done[1], True
        provenance = Provenance(base_fingerprint=self.base.fingerprint, method="upload",
                                hyperparams=adapter.spec.to_dict(), creator=creator)
        return self.registry.commit(ref, blob, provenance, creator=creator, aliases=(alias,), create=False,
                                    key=key), False

    def load_lora(self, lora_name: str, lora_path: str, *, creator: str, replace: bool = False):
        """vLLM's ``load_lora_adapter`` / ``--lora-modules``: import the PEFT folder at ``lora_path`` as the
        adapter ``lora_name`` stands for and point ``live`` at it. A name already live is refused unless
        ``replace`` (vLLM's ``load_inplace``); the same weights again are a no-op."""
        ref = imports.lora_ref(lora_name)
        try:
            live = self.registry.get_adapter(ref).aliases.get("live")
        except NotFoundError:
            live = None
        if live is not None and not replace:
            raise ApiError(400, f"The lora adapter '{lora_name}' has already been loaded ({ref}#{live}); pass "
                                "load_inplace=true to replace it", code="already_loaded", param="lora_name")
        return imports.import_path(self.registry, self.base, lora_path, ref, alias="live", creator=creator,
                                   max_bytes=self.limits.max_upload_bytes)

    def unload_lora(self, lora_name: str, *, actor: str):
        """vLLM's ``unload_lora_adapter``: remove the ``live`` alias (audited); the revisions stay."""
        ref = imports.lora_ref(lora_name)
        try:
            info = self.registry.get_adapter(ref)
        except NotFoundError:
            info = None
        if info is None or "live" not in info.aliases:
            raise ApiError(404, f"The lora adapter '{lora_name}' cannot be found.", type_="not_found_error",
                           code="not_found", param="lora_name")
        return self.registry.delete_alias(ref, "live", actor=actor, reason="unload_lora_adapter")

    # ---------------------------------------------------------------- serving

    def residency(self) -> dict:
        if self.engine is None:
            return {"slots": [], "ram": [], "note": "no engine attached"}
        snap = self.engine.residency_snapshot()
        snap["metrics"] = self.engine.metrics_snapshot()
        return snap
