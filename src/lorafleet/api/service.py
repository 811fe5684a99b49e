"""What the HTTP app serves from: the registry, the resident base, the engine, keys, jobs, limits."""

from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from lorafleet.adapters import AdapterError, LoraAdapter, from_bytes, load_peft, peft_io, to_bytes
from lorafleet.api.errors import ApiError
from lorafleet.api.keys import KeyStore
from lorafleet.api.metrics import RequestCounter
from lorafleet.continual.schedule import Scheduler
from lorafleet.registry import Provenance, Registry
from lorafleet.registry.memory import MemoryStore
from lorafleet.serving.contract import EngineLike
from lorafleet.training.jobs import JobQueue
from lorafleet.training.worker import Worker

log = logging.getLogger(__name__)

# Files a PEFT upload may carry. Pickle names are accepted only so the loader can refuse them by name.
UPLOAD_NAMES = {peft_io.CONFIG_FILE, peft_io.WEIGHTS_FILE} | {f"adapter_model{s}" for s in peft_io.PICKLE_SUFFIXES}


@dataclass(frozen=True)
class Limits:
    """Request limits of the HTTP service."""

    max_upload_bytes: int = 64 * 1024 * 1024  # an adapter upload
    max_body_bytes: int = 4 * 1024 * 1024  # a JSON request (chat, jobs)
    max_tokens: int = 1024  # per completion
    max_prompt_tokens: int = 4096


class Service:
    """Holds the long-lived parts of a server process; the app reads them from ``app.state.service``."""

    def __init__(self, registry: Registry, base, engine: EngineLike | None = None, *, limits: Limits | None = None,
                 run_worker: bool = False) -> None:
        self.registry = registry
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
        """Validate a multipart PEFT upload (adapter_config.json + adapter_model.safetensors) fully in a temp dir."""
        self._check_base(base_fingerprint)
        if not files:
            raise ApiError(400, "no file uploaded: send adapter_config.json and adapter_model.safetensors as "
                                "multipart files", code="invalid_upload")
        with tempfile.TemporaryDirectory(prefix="lorafleet-upload-") as tmp:
            for filename, data in files.items():
                name = Path(filename).name  # never a path: no traversal out of the temp dir
                if name not in UPLOAD_NAMES:
                    raise ApiError(422, f"unexpected file {filename!r}: a PEFT upload holds "
                                        f"{peft_io.CONFIG_FILE} and {peft_io.WEIGHTS_FILE}", code="invalid_upload")
                if len(data) > self.limits.max_upload_bytes:
                    raise ApiError(413, f"{name} is over the limit of {self.limits.max_upload_bytes} bytes",
                                   code="too_large")
                (Path(tmp) / name).write_bytes(data)
            try:
                return load_peft(tmp, self.base, max_bytes=self.limits.max_upload_bytes)
            except AdapterError as exc:  # name the upload, not our temp dir
                raise AdapterError(str(exc).replace(tmp, "the upload")) from None

    def validate_blob(self, body: bytes, base_fingerprint: str | None) -> LoraAdapter:
        """Validate a raw body: lorafleet canonical adapter bytes (safetensors with the spec in its metadata)."""
        self._check_base(base_fingerprint)
        if not body:
            raise ApiError(400, "empty upload body", code="invalid_upload")
        return from_bytes(body, self.base, max_bytes=self.limits.max_upload_bytes)

    def commit_uploaded(self, ref: str, adapter: LoraAdapter, *, creator: str, alias: str):
        provenance = Provenance(base_fingerprint=self.base.fingerprint, method="upload",
                                hyperparams=adapter.spec.to_dict(), creator=creator)
        return self.registry.commit(ref, to_bytes(adapter), provenance, creator=creator, aliases=(alias,), create=False)

    # ---------------------------------------------------------------- serving

    def residency(self) -> dict:
        if self.engine is None:
            return {"slots": [], "ram": [], "note": "no engine attached"}
        snap = self.engine.residency_snapshot()
        snap["metrics"] = self.engine.metrics_snapshot()
        return snap
