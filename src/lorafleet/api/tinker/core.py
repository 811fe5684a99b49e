"""The Tinker service's logic, independent of HTTP: runs, training ops, checkpoints, sampling.

Training runs through :mod:`.scheduler` on the resident base (packed across clients); sampling goes through
the serving :class:`~lorafleet.serving.engine.Engine`; every sampler checkpoint is committed to the registry
as a revision of the run's adapter (provenance ``method="tinker"``), so it can be evaluated, promoted and
served through the OpenAI API like any other revision.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import shutil
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import torch

from lorafleet import __version__
from lorafleet.adapters import LoraAdapter, LoraHost, LoraSpec, from_bytes, save_peft, to_bytes
from lorafleet.adapters.spec import ATTENTION_TARGETS, MAX_RANK, MLP_TARGETS
from lorafleet.api.keys import ApiKey
from lorafleet.api.tinker import losses, wire
from lorafleet.api.tinker.scheduler import Op, Scheduler
from lorafleet.api.tinker.state import (
    Checkpoint,
    FutureStore,
    Run,
    SamplerSession,
    Session,
    TinkerNotFoundError,
    TinkerUserError,
    new_id,
    utcnow,
)
from lorafleet.config import data_dir
from lorafleet.digest import digest_of
from lorafleet.registry import Provenance
from lorafleet.registry.names import check_segment, parse_address
from lorafleet.serving.params import SamplingParams
from lorafleet.training.checkpoint import checkpoint_from_bytes, checkpoint_to_bytes, load_weights, weights_of
from lorafleet.training.losses import next_token_logprobs
from lorafleet.training.step import backward_sum, packed_forward


@dataclass(frozen=True)
class TinkerConfig:
    """Limits and defaults of the Tinker-compatible service."""

    lora_alpha: float = 32.0  # LoRA scaling numerator for every run (scaling = alpha / rank)
    max_batch_tokens: int = 4096  # padded tokens per packed forward/backward micro-batch (memory bound)
    max_request_tokens: int = 262_144  # tokens in one forward_backward request
    long_poll_s: float = 25.0  # retrieve_future holds a pending request this long before "try_again"
    gap_wait_s: float = 5.0  # a missing seq_id is skipped after this long
    pack_wait_s: float = 0.2  # before a pass, wait this long for just-served clients' next forward_backward


RUN_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+(:train:[0-9]+)?$")


def _user(message: str) -> TinkerUserError:
    return TinkerUserError(message)


class TinkerService:
    """State and operations behind the routes; one per app (``app.state.tinker``)."""

    def __init__(self, service, config: TinkerConfig | None = None, home: Path | None = None) -> None:
        self.service, self.config = service, config or TinkerConfig()
        self.base, self.registry = service.base, service.registry
        self.home = home or default_home()
        self.sessions: dict[str, Session] = {}
        self.runs: dict[str, Run] = {}
        self.samplers: dict[str, SamplerSession] = {}
        self.futures = FutureStore()
        self.host = LoraHost.attach(self.base.model)
        self.scheduler = Scheduler(self._forward_backward, {
            "optim_step": self._optim_step, "save_state": self._save_state, "load_state": self._load_state,
            "save_sampler": self._save_sampler, "save_external": self._save_external},
            gap_wait_s=self.config.gap_wait_s,
            pack_wait_s=self.config.pack_wait_s)
        self._lock = threading.Lock()
        self._adapters: dict[str, LoraAdapter] = {}  # digest -> parsed adapter, for sampled log-probs
        # future -> the adapter ref whose data its result holds (so forgetting a user drops their results)
        self._future_refs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Held while something of a run is persisted (checkpoint file, revision) and while a user is forgotten:
        # a save either finishes before the forget (which then deletes it) or sees the run forgotten and refuses.
        self._persist_lock = threading.Lock()
        self._url_secret = secrets.token_bytes(32)  # signs external-weights download URLs (this process only)
        self.vocab = self.base.model.get_input_embeddings().num_embeddings
        self.max_seq_len = int(getattr(self.base.config, "max_position_embeddings", 2048))

    @property
    def max_rank(self) -> int:
        engine = self.service.engine
        return min(MAX_RANK, engine.config.max_rank) if engine is not None and hasattr(engine, "config") else MAX_RANK

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    # ------------------------------------------------------------------ sessions and runs

    def capabilities(self) -> dict:
        return {"supported_models": [{"model_name": self.base.name, "max_context_length": self.max_seq_len,
                                      "trainable": True, "sampleable": self.service.engine is not None}]}

    def create_session(self, key: ApiKey, body: dict | None = None) -> str:
        body = body or {}
        project = body.get("project_id")
        if project is not None and project != self.project_of(key):
            raise _user(f"project_id {project!r}: this key's only project is its tenant, "
                        f"{self.project_of(key)!r}")
        session = Session(new_id("session"), key.tenant, f"tinker:{key.prefix}",
                          user_metadata={str(k): str(v) for k, v in (body.get("user_metadata") or {}).items()},
                          display_name=body.get("display_name"))
        with self._lock:
            self.sessions[session.session_id] = session
        return session.session_id

    def project_of(self, key: ApiKey) -> str:
        """Tinker's project of a key: its tenant (an admin key's sessions are in project 'admin')."""
        return _project(key.tenant)

    def session_of(self, key: ApiKey, session_id: str) -> Session:
        with self._lock:
            session = self.sessions.get(session_id)
        if session is None or not (key.is_admin or session.tenant == key.tenant):
            raise TinkerNotFoundError(f"session {session_id!r} does not exist (create one with create_session)")
        return session

    def check_session(self, key: ApiKey, session_id: str, *, live: bool = True) -> None:
        session = self.session_of(key, session_id)
        if live and session.finished is not None:
            raise _user(f"session {session_id!r} has finished ({session.finished}); start a new ServiceClient")

    def finish_session(self, key: ApiKey, session_id: str, body: dict) -> None:
        session = self.session_of(key, session_id)
        with self._lock:
            if session.finished is None:  # first wins, as on Tinker
                session.finished = (body.get("reason") or {}).get("type", "success")

    def search_sessions(self, key: ApiKey, body: dict) -> dict:
        """``RestClient.search_sessions``: the key's sessions (every tenant's for an admin key) matching every
        given filter, newest first, paged by a ``(created_at, session_id)`` cursor."""
        owner = (body.get("owner") or {}).get("type", "own")
        if owner == "user":
            raise _user("sessions/search: owner type 'user' is not supported by lorafleet (use 'own' or "
                        "'accessible'; a key sees its own tenant's sessions)")
        projects = body.get("project_ids")
        allowed = None if key.is_admin else {self.project_of(key)}
        if projects is not None and allowed is not None and not set(projects) <= allowed:
            raise _user(f"sessions/search: project_ids {sorted(set(projects) - allowed)} cannot be listed with this "
                        f"key (its project is {self.project_of(key)!r})")
        wanted_meta = body.get("user_metadata") or {}
        name_words = (body.get("display_name") or "").lower().split()
        sid = body.get("session_id")

        def status_ok(s: Session) -> bool:
            queries = body.get("statuses")
            if queries is None:
                return True
            status = s.status()
            return any(q["type"] == status["type"] and (
                q["type"] != "client_finished" or not q.get("reasons") or status["reason"]["type"] in q["reasons"])
                for q in queries)

        def named(s: Session) -> bool:  # session_id and display_name: either one matches
            if sid is None and not name_words:
                return True
            by_name = bool(name_words) and all(w in (s.display_name or "").lower() for w in name_words)
            return s.session_id == sid or by_name

        with self._lock:
            sessions = list(self.sessions.values())
        found = [s for s in sessions
                 if (key.is_admin or s.tenant == key.tenant)
                 and (projects is None or _project(s.tenant) in projects)
                 and all(s.user_metadata.get(k) == v for k, v in wanted_meta.items())
                 and named(s) and status_ok(s)]
        found.sort(key=lambda s: (s.created, s.session_id), reverse=True)
        cursor = body.get("cursor")
        if cursor is not None:
            try:
                last = (datetime.fromisoformat(cursor["last_created_at"]), cursor["last_session_id"])
            except ValueError:
                raise _user(f"sessions/search: cursor.last_created_at {cursor['last_created_at']!r} is not an "
                            "ISO 8601 time (pass a response's next_cursor back unchanged)") from None
            if last[0].tzinfo is None:
                raise _user("sessions/search: cursor.last_created_at needs a time zone")
            found = [s for s in found if (s.created, s.session_id) < last]
        page = found[: body.get("limit", 50)]
        more = len(found) > len(page)
        return {"sessions": [self._summary(s) for s in page],
                "next_cursor": {"last_created_at": page[-1].created.isoformat(),
                                "last_session_id": page[-1].session_id} if more else None}

    def list_sessions(self, key: ApiKey, limit: int, offset: int) -> dict:
        """``RestClient.list_sessions``: the key's sessions (every tenant's for an admin key), newest first."""
        with self._lock:
            mine = [s for s in self.sessions.values() if key.is_admin or s.tenant == key.tenant]
        mine.sort(key=lambda s: (s.created, s.session_id), reverse=True)
        return {"sessions": [s.session_id for s in mine[offset: offset + limit]]}

    def get_session(self, key: ApiKey, session_id: str) -> dict:
        """``RestClient.get_session``: the session's training runs and samplers, its metadata and name."""
        s = self.session_of(key, session_id)
        with self._lock:
            runs = [r.run_id for r in self.runs.values() if r.session_id == session_id]
            samplers = [x.sampler_id for x in self.samplers.values() if x.session_id == session_id]
        return {"training_run_ids": runs, "sampler_ids": samplers, "user_metadata": dict(s.user_metadata) or None,
                "display_name": s.display_name}

    def weights_info(self, key: ApiKey, tinker_path: str) -> dict:
        """``RestClient.get_weights_info_by_tinker_path``: base, rank and targets of a checkpoint of the key's."""
        kind = ("sampler" if "/sampler_weights/" in tinker_path else
                "external" if "/external_weights/" in tinker_path else "training")
        ckpt = self.find_checkpoint(key, tinker_path, kind)
        if ckpt.file is not None:
            sidecar = _external_sidecar(Path(ckpt.file)) if kind == "external" else Path(ckpt.file).with_suffix(".json")
            spec = json.loads(sidecar.read_text())["spec"]
            rank, targets = int(spec["rank"]), set(spec["target_modules"])
        else:
            run = self.runs[tinker_path[len("tinker://"):].split("/")[0]]
            rank, targets = run.adapter.spec.rank, set(run.adapter.spec.target_modules)
        return {"base_model": self.base.name, "is_lora": True, "lora_rank": rank, "train_unembed": False,
                "train_attn": bool(targets & set(ATTENTION_TARGETS)), "train_mlp": bool(targets & set(MLP_TARGETS))}

    def _summary(self, s: Session) -> dict:
        runs = [r for r in list(self.runs.values()) if r.session_id == s.session_id]
        return {"session_id": s.session_id, "created_at": s.created.isoformat(), "owner": s.owner,
                "project_id": _project(s.tenant), "status": s.status(),
                "checkpoints_count": sum(len(r.checkpoints) for r in runs), "display_name": s.display_name,
                "user_metadata": dict(s.user_metadata) or None}

    def check_base(self, base_model: str | None) -> None:
        if base_model is not None and base_model != self.base.name:
            raise _user(f"base_model {base_model!r} is not served here: this lorafleet server trains and samples "
                        f"{self.base.name!r} only (see get_server_capabilities)")

    def run_of(self, key: ApiKey, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None or not (key.is_admin or run.tenant == key.tenant):  # another tenant's run looks absent
            raise TinkerNotFoundError(f"training run {run_id!r} does not exist")
        return run

    def _adapter_ref(self, key: ApiKey, run_id: str, metadata: dict) -> str:
        wanted = str(metadata.get("lorafleet_adapter") or "")
        parts = wanted.split("/") if wanted else []
        if len(parts) == 3:
            tenant, user, name = parts
        elif len(parts) == 2:
            tenant, (user, name) = key.tenant, parts
        elif not parts:
            tenant, user, name = key.tenant, "tinker", run_id
        else:
            raise _user(f"user_metadata.lorafleet_adapter must be 'user/name' or 'tenant/user/name', got {wanted!r}")
        if tenant is None:
            raise _user("an admin key has no tenant: set user_metadata.lorafleet_adapter to 'tenant/user/name'")
        if not key.is_admin and tenant != key.tenant:
            raise _user(f"user_metadata.lorafleet_adapter names tenant {tenant!r}, but this key belongs to "
                        f"tenant {key.tenant!r}")
        for value, what in ((tenant, "tenant"), (user, "user"), (name, "adapter")):
            check_segment(value, what)
        return f"{tenant}/{user}/{name}"

    def create_model(self, key: ApiKey, body: dict) -> Run:
        self.check_session(key, str(body.get("session_id", "")))
        self.check_base(body.get("base_model"))
        lora = body.get("lora_config")
        if not isinstance(lora, dict):
            raise _user("create_model: lora_config is required (full fine-tuning is not offered: lorafleet trains "
                        "LoRA adapters over the shared base)")
        rank = lora.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.max_rank:
            raise _user(f"lora_config.rank must be an integer in 1..{self.max_rank} (the largest rank this server's "
                        f"engine serves), got {rank!r}")
        targets = (ATTENTION_TARGETS if lora.get("train_attn", True) else ()) + (
            MLP_TARGETS if lora.get("train_mlp", True) else ())
        if not targets:
            raise _user("lora_config: set train_attn and/or train_mlp; lorafleet adapters adapt the attention and MLP "
                        "projections (train_unembed alone is not supported)")
        spec = LoraSpec(rank=rank, alpha=self.config.lora_alpha, target_modules=targets)
        seed = lora.get("seed")
        return self._new_run(key, body, spec, secrets.randbelow(2**31) if seed is None else int(seed),
                             unembed=bool(lora.get("train_unembed", True)))

    def create_from_state(self, key: ApiKey, body: dict) -> tuple[Run, Checkpoint]:
        """``create_training_client_from_state[_with_optimizer]``: a new run shaped like the checkpoint."""
        self.check_session(key, str(body.get("session_id", "")))
        self.check_base(body.get("base_model"))
        ckpt = self.find_checkpoint(key, str(body.get("path", "")), "training")
        meta = json.loads(Path(ckpt.file).with_suffix(".json").read_text())
        spec = LoraSpec(**{k: (tuple(v) if k == "target_modules" else v) for k, v in meta["spec"].items()})
        if spec.rank > self.max_rank:
            raise _user(f"checkpoint {ckpt.tinker_path} has rank {spec.rank}, above this server's {self.max_rank}")
        return self._new_run(key, body, spec, 0, unembed=False), ckpt

    def _new_run(self, key: ApiKey, body: dict, spec: LoraSpec, seed: int, *, unembed: bool) -> Run:
        optimizer = body.get("optimizer_config") or {"type": "adamw"}
        if optimizer.get("type", "adamw") != "adamw":
            raise _user(f"optimizer_config.type {optimizer.get('type')!r} is not supported; use AdamW ('adamw')")
        seq = body.get("model_seq_id")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise _user(f"model_seq_id must be a non-negative integer, got {seq!r}")
        run_id = f"{body['session_id']}:train:{seq}"  # the SDK derives this id itself (create from state)
        if run_id in self.runs:
            raise _user(f"model_seq_id {seq} was already used in session {body['session_id']}")
        metadata = body.get("user_metadata") or {}
        ref = self._adapter_ref(key, run_id.replace(":", "-"), metadata)
        adapter = LoraAdapter.create(self.base, spec, seed=seed)
        for name, (A, B) in list(adapter.weights.items()):
            adapter.weights[name] = (A.requires_grad_(True), B.requires_grad_(True))
        params = [t for ab in adapter.weights.values() for t in ab]
        run = Run(run_id=run_id, session_id=body["session_id"], tenant=ref.split("/")[0], ref=ref,
                  creator=f"tinker:{key.prefix}", adapter=adapter, user_metadata=dict(metadata),
                  optimizer=torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0),
                  unembed_requested=unembed)
        self.registry.create_adapter(ref, creator=run.creator, exist_ok=True,
                                     description=f"trained through the Tinker API (run {run_id})")
        with self._lock:
            if run_id in self.runs:
                raise _user(f"model_seq_id {seq} was already used in session {body['session_id']}")
            self.runs[run_id] = run
        return run

    def info(self, run: Run) -> dict:
        return {"type": "get_info", "model_id": run.run_id, "is_lora": True, "lora_rank": run.adapter.spec.rank,
                "model_name": self.base.name,
                "model_data": {"arch": self.base.config.model_type, "model_name": self.base.name,
                               "tokenizer_id": None}}

    # ------------------------------------------------------------------ training requests (validated here)

    def _check_tokens(self, tokens: list[int], where: str) -> None:
        if not tokens:
            raise _user(f"{where}: model_input is empty")
        if min(tokens) < 0 or max(tokens) >= self.vocab:
            raise _user(f"{where}: token ids must be in [0, {self.vocab}), got min {min(tokens)} max {max(tokens)}")
        if len(tokens) > self.max_seq_len:
            raise _user(f"{where}: {len(tokens)} tokens exceed the base's context of {self.max_seq_len}")

    def forward_backward(self, key: ApiKey, request: dict) -> concurrent.futures.Future:
        run = self.run_of(key, request["model_id"])
        loss_fn = request["loss_fn"]
        config = losses.loss_config(loss_fn, request.get("loss_fn_config"))  # the loss's keys, defaults filled in
        if not request["data"]:
            raise _user("forward_backward: data is empty")
        needed, data, total = losses.LOSS_INPUTS[loss_fn], [], 0
        for i, datum in enumerate(request["data"]):
            tokens, inputs = datum["tokens"], datum["inputs"]
            self._check_tokens(tokens, f"data[{i}]")
            total += len(tokens)
            missing = [n for n in needed if n not in inputs]
            if missing:
                raise _user(f"data[{i}].loss_fn_inputs is missing {missing} (loss_fn {loss_fn!r} needs {list(needed)})")
            clean = {}
            for name in needed:
                arr = np.asarray(inputs[name]).reshape(-1)
                if arr.shape[0] != len(tokens):
                    raise _user(f"data[{i}].loss_fn_inputs[{name!r}] has {arr.shape[0]} entries but model_input has "
                                f"{len(tokens)} tokens; they must have the same length")
                if name == "target_tokens":
                    if arr.min() < 0 or arr.max() >= self.vocab:
                        raise _user(f"data[{i}].target_tokens must be in [0, {self.vocab})")
                    clean[name] = torch.as_tensor(arr.astype(np.int64))
                else:
                    if not np.isfinite(arr).all():
                        raise _user(f"data[{i}].loss_fn_inputs[{name!r}] has NaN or infinite values")
                    clean[name] = torch.as_tensor(arr.astype(np.float32))
            data.append((tokens, clean))
        if total > self.config.max_request_tokens:
            raise _user(f"forward_backward: {total} tokens in one request; at most {self.config.max_request_tokens}")
        payload = {"loss_fn": loss_fn, "loss_config": config, "data": data,
                   "forward_only": bool(request["forward_only"])}
        return self._submit(run, request.get("seq_id") or None, "forward_backward", payload)

    def optim_step(self, key: ApiKey, body: dict) -> concurrent.futures.Future:
        run = self.run_of(key, str(body.get("model_id", "")))
        adam = body.get("adam_params")
        if not isinstance(adam, dict):
            raise _user("optim_step: adam_params are required (lorafleet trains with AdamW)")
        adam = dict(adam)
        if adam.pop("type", "adamw") != "adamw":
            raise _user("optim_step: only AdamW parameters are supported (adam_params); this run's optimizer is AdamW")
        p = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0,
             "grad_clip_norm": 0.0} | adam
        checks = {"learning_rate": p["learning_rate"] >= 0, "beta1": 0 <= p["beta1"] < 1,
                  "beta2": 0 <= p["beta2"] < 1, "eps": p["eps"] > 0, "weight_decay": p["weight_decay"] >= 0,
                  "grad_clip_norm": p["grad_clip_norm"] >= 0}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise _user(f"adam_params field(s) {bad} out of range: got {[p[k] for k in bad]}")
        return self._submit(run, body.get("seq_id"), "optim_step", p)

    def save(self, key: ApiKey, body: dict, *, sampler: bool) -> concurrent.futures.Future:
        run = self.run_of(key, str(body.get("model_id", "")))
        name = body.get("path")
        if name is not None:
            check_segment(str(name), "checkpoint name")
        elif not sampler or body.get("sampling_session_seq_id") is None:
            name = f"step-{run.steps:06d}"  # the SDK always names durable saves; a default keeps curl usable
        metadata = dict(body.get("user_metadata") or {})
        reserved = sorted(k for k in metadata if k.startswith("lorafleet_"))
        if reserved:
            raise _user(f"user_metadata keys {reserved}: the 'lorafleet_' prefix is reserved for the server's own keys")
        payload = {"name": name, "session_id": run.session_id, "user_metadata": metadata}
        return self._submit(run, body.get("seq_id"), "save_sampler" if sampler else "save_state", payload)

    def save_external(self, key: ApiKey, body: dict) -> concurrent.futures.Future:
        """``save_weights_external``: the run's current weights as a PEFT folder (what ``lorafleet adapters export
        --format peft`` writes), downloadable through :meth:`external_urls`."""
        run = self.run_of(key, str(body.get("model_id", "")))
        if body.get("age_encryption_recipients"):
            raise _user("save_weights_external: age_encryption_recipients are not supported by lorafleet (the "
                        "files are served over this server's own HTTP, to this tenant's keys' signed URLs)")
        name = check_segment(str(body.get("path") or ""), "checkpoint name")
        return self._submit(run, body.get("seq_id"), "save_external", {"name": name})

    def external_urls(self, key: ApiKey, run_id: str, checkpoint_id: str, base_url: str) -> dict:
        """Signed download URLs (valid :data:`URL_TTL_S`) for every file of an external-weights checkpoint."""
        prefix = "external_weights/"
        if not checkpoint_id.startswith(prefix):
            raise _user(f"checkpoint {checkpoint_id!r} is not an external weights checkpoint "
                        "('external_weights/<name>')")
        ckpt = self.find_checkpoint(key, f"tinker://{run_id}/{checkpoint_id}", "external")
        folder = Path(ckpt.file)
        expires = utcnow() + timedelta(seconds=URL_TTL_S)
        urls = {}
        for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            urls[file.name] = f"{base_url.rstrip('/')}/api/v1/external_weights_files/{self._sign(file, expires)}"
        return {"urls": urls, "expires": expires.isoformat()}

    def _sign(self, file: Path, expires: datetime) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(
            [str(file.relative_to(self.home)), int(expires.timestamp())]).encode()).decode().rstrip("=")
        mac = hmac.new(self._url_secret, payload.encode(), hashlib.sha256).hexdigest()
        return f"{payload}.{mac}"

    def signed_file(self, token: str) -> Path:
        """The file a download token of :meth:`external_urls` names, if its signature holds and it has not expired."""
        payload, _, mac = token.partition(".")
        want = hmac.new(self._url_secret, payload.encode(), hashlib.sha256).hexdigest()
        # compared as bytes: compare_digest refuses str with non-ASCII characters (a 500 on a fuzzed URL)
        if not mac or not hmac.compare_digest(mac.encode(), want.encode()):
            raise TinkerNotFoundError("this download URL is not valid (get a new one with get_external_weights_urls)")
        rel, exp = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        if time.time() > exp:
            raise TinkerNotFoundError("this download URL has expired (get a new one with get_external_weights_urls)")
        file = self.home / rel
        if not file.is_file():  # deleted since (its user was forgotten)
            raise TinkerNotFoundError("this file does not exist any more")
        return file

    def load(self, key: ApiKey, body: dict) -> tuple[concurrent.futures.Future, str]:
        if body.get("model_id") is None:
            run, ckpt = self.create_from_state(key, body)
        else:
            run = self.run_of(key, str(body.get("model_id", "")))
            ckpt = self.find_checkpoint(key, str(body.get("path", "")), "training")
        fut = self._submit(run, body.get("seq_id"), "load_state",
                           {"checkpoint": ckpt, "optimizer": bool(body.get("optimizer", False))})
        return fut, run.run_id

    def _submit(self, run: Run, seq_id, kind: str, payload: dict) -> concurrent.futures.Future:
        run.last_request = utcnow()
        seq = int(seq_id) if isinstance(seq_id, int) and not isinstance(seq_id, bool) and seq_id > 0 else None
        fut = self.scheduler.submit(Op(run=run, seq_id=seq, kind=kind, payload=payload))
        self._future_refs[fut] = run.ref
        return fut

    # ------------------------------------------------------------------ training ops (scheduler thread)

    def _forward_backward(self, ops: list[Op]) -> list[bytes]:
        """One packed pass over every op's datums (micro-batched by padded tokens); one result per op."""
        runs = list(dict.fromkeys(op.run.run_id for op in ops))
        slot_of = {rid: i for i, rid in enumerate(runs)}
        adapters = [next(op.run for op in ops if op.run.run_id == rid).adapter for rid in runs]
        rows = [(k, j) for k, op in enumerate(ops) for j in range(len(op.payload["data"]))]
        logps: dict[tuple[int, int], torch.Tensor] = {}
        for batch in self._micro_batches(ops, rows):
            datums = [ops[k].payload["data"][j] for k, j in batch]
            grad = any(not ops[k].payload["forward_only"] for k, _ in batch)
            logp = packed_forward(self.base, adapters, [slot_of[ops[k].run.run_id] for k, _ in batch],
                                  [tokens for tokens, _ in datums], [inputs["target_tokens"] for _, inputs in datums],
                                  score=next_token_logprobs, pad_id=0, label_pad=0, grad=grad)  # (b, T)
            terms = []
            for r, (k, j) in enumerate(batch):
                op = ops[k]
                tokens, inputs = datums[r]
                row = logp[r, : len(tokens)].cpu()  # (T_j,)
                loss = losses.elementwise_loss(op.payload["loss_fn"], row, inputs, op.payload.get("loss_config"))
                logps[(k, j)] = torch.stack([row.detach(), loss.detach()])
                if not op.payload["forward_only"]:
                    terms.append(loss.sum())
            backward_sum(terms)  # gradients accumulate in each run's adapter until its optim_step
        out = []
        for k, op in enumerate(ops):
            outputs, loss_sum, weight = [], 0.0, 0.0
            for j, (_, inputs) in enumerate(op.payload["data"]):
                row_logp, row_loss = logps[(k, j)]
                outputs.append({"logprobs": row_logp.numpy(), "elementwise_loss": row_loss.numpy()})
                loss_sum += float(row_loss.sum())
                weight += losses.token_weight(op.payload["loss_fn"], inputs)
            run = op.run
            if not op.payload["forward_only"]:
                run.pending_grad = True
                run.datums += len(outputs)
                run.tokens += int(weight)
                run.loss_fns.add(op.payload["loss_fn"])
                if op.payload.get("loss_config"):
                    run.loss_configs[op.payload["loss_fn"]] = dict(op.payload["loss_config"])
                run.losses.append(loss_sum / weight if weight else 0.0)
            out.append(wire.encode_forward_backward_output(outputs, {"loss:sum": loss_sum}))
        return out

    def _micro_batches(self, ops: list[Op], rows: list[tuple[int, int]]):
        """Rows grouped so that rows x longest row stays within ``max_batch_tokens`` (one row at least)."""
        batch, width = [], 0
        for k, j in rows:
            n = len(ops[k].payload["data"][j][0])
            if batch and max(width, n) * (len(batch) + 1) > self.config.max_batch_tokens:
                yield batch
                batch, width = [], 0
            batch.append((k, j))
            width = max(width, n)
        if batch:
            yield batch

    def _optim_step(self, op: Op) -> dict:
        run, p = op.run, op.payload
        params = run.params()
        grads = [t.grad for t in params if t.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        if p["grad_clip_norm"] > 0 and grads:
            torch.nn.utils.clip_grad_norm_(params, p["grad_clip_norm"])
        for group in run.optimizer.param_groups:
            group.update(lr=p["learning_rate"], betas=(p["beta1"], p["beta2"]), eps=p["eps"],
                         weight_decay=p["weight_decay"])
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.steps += 1
        run.pending_grad = False
        run.last_adam = dict(p)
        return {"metrics": {"grad_norm:mean": norm, "step:max": float(run.steps)}}

    def _path(self, run: Run, kind: str, name: str) -> str:
        return f"tinker://{run.run_id}/{'sampler_weights' if kind == 'sampler' else 'weights'}/{name}"

    def _refuse_forgotten(self, run: Run) -> None:
        if run.forgotten:
            raise TinkerNotFoundError(f"training run {run.run_id!r} does not exist (its user was forgotten)")

    def _save_state(self, op: Op) -> dict:
        with self._persist_lock:
            self._refuse_forgotten(op.run)
            return self._save_state_locked(op)

    def _save_state_locked(self, op: Op) -> dict:
        run, name = op.run, op.payload["name"]
        if run.checkpoint("training", name) is not None:
            raise _user(f"checkpoint {name!r} already exists in run {run.run_id}; pick another name")
        state = {"weights": weights_of(run.adapter),
                 "optimizer": run.optimizer.state_dict(), "step": run.steps, "cursor": 0, "order": [], "epoch": 0,
                 "losses": list(run.losses)}
        data = checkpoint_to_bytes(state)
        folder = self.home / run.tenant / run.run_id
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / f"{name}.safetensors"
        meta = op.payload.get("user_metadata") or {}
        (folder / f"{name}.json").write_text(json.dumps({"spec": run.adapter.spec.to_dict(), "ref": run.ref,
                                                          "base_fingerprint": self.base.fingerprint,
                                                          "user_metadata": meta}))
        tmp = file.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(file)  # atomic: a crash leaves no half-written checkpoint
        path = self._path(run, "training", name)
        run.checkpoints.append(Checkpoint(f"weights/{name}", "training", path, utcnow(), len(data), file=str(file),
                                          user_metadata=dict(meta)))
        return {"path": path, "type": "save_weights"}

    def _load_state(self, op: Op) -> dict:
        run, ckpt = op.run, op.payload["checkpoint"]
        meta = json.loads(Path(ckpt.file).with_suffix(".json").read_text())
        if meta["spec"] != run.adapter.spec.to_dict():
            raise _user(f"checkpoint {ckpt.tinker_path} holds a LoRA {meta['spec']}, but run {run.run_id} is "
                        f"{run.adapter.spec.to_dict()}: create the training client with the same rank and targets")
        state = checkpoint_from_bytes(Path(ckpt.file).read_bytes())
        load_weights(run.adapter, state["weights"])
        if op.payload["optimizer"]:
            run.optimizer.load_state_dict(state["optimizer"])
            run.steps = int(state["step"])
        run.optimizer.zero_grad(set_to_none=True)
        return {"path": ckpt.tinker_path, "model_id": run.run_id, "type": "load_weights"}

    def _save_external(self, op: Op) -> dict:
        with self._persist_lock:
            self._refuse_forgotten(op.run)
            run, name = op.run, op.payload["name"]
            if run.checkpoint("external", name) is not None:
                raise _user(f"external weights {name!r} already exist in run {run.run_id}; pick another name")
            snapshot = self._snapshot(run)
            snapshot.check_delta_norms(self.base)
            folder = self.home / run.tenant / run.run_id / "external_weights" / name
            folder.parent.mkdir(parents=True, exist_ok=True)
            # the sidecar first: forgetting the user finds the folder even if the process dies while writing it
            _external_sidecar(folder).write_text(json.dumps({"spec": run.adapter.spec.to_dict(), "ref": run.ref,
                                                             "base_fingerprint": self.base.fingerprint}))
            save_peft(snapshot, folder)  # the PEFT writer `lorafleet adapters export --format peft` uses
            size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            path = f"tinker://{run.run_id}/external_weights/{name}"
            run.checkpoints.append(Checkpoint(f"external_weights/{name}", "external", path, utcnow(), size,
                                              file=str(folder)))
            return {"path": path, "size_bytes": size, "type": "save_weights_external"}

    def _snapshot(self, run: Run) -> LoraAdapter:
        return LoraAdapter(spec=run.adapter.spec, weights=weights_of(run.adapter), base_name=self.base.name)

    def _save_sampler(self, op: Op) -> dict:
        with self._persist_lock:
            self._refuse_forgotten(op.run)
            return self._save_sampler_locked(op)

    def _save_sampler_locked(self, op: Op) -> dict:
        run, name = op.run, op.payload["name"]
        snapshot = self._snapshot(run)
        snapshot.check_delta_norms(self.base)  # AdapterError (a user error): weights too large to serve
        data = to_bytes(snapshot)
        if name is None:  # save_weights_and_get_sampling_client: an ephemeral sampler, no revision
            digest = digest_of(data)
            self.registry.blobs.put(digest, data)  # content-addressed; the engine fetches it by digest
            run.ephemeral_digests.add(digest)  # no revision references it: forgetting the user deletes it
            sampler = self._new_sampler(run.tenant, None, digest, ref=run.ref, session_id=run.session_id)
            return {"sampling_session_id": sampler.sampler_id, "type": "save_weights_for_sampler"}
        if run.checkpoint("sampler", name) is not None:
            raise _user(f"sampler checkpoint {name!r} already exists in run {run.run_id}; pick another name")
        path = self._path(run, "sampler", name)
        hyper = {"loss": sorted(run.loss_fns), "loss_fn_config": dict(run.loss_configs), "steps": run.steps,
                 "datums": run.datums, "target_tokens": run.tokens,
                 "rank": run.adapter.spec.rank, "alpha": run.adapter.spec.alpha,
                 "target_modules": list(run.adapter.spec.target_modules), "adam": run.last_adam,
                 "train_loss": run.losses[-1] if run.losses else None, "tinker_run": run.run_id,
                 "base_precision": getattr(self.base, "precision_label", "fp32"),
                 "tinker_path": path, "train_unembed_requested": run.unembed_requested,
                 "user_metadata": dict(op.payload.get("user_metadata") or {}),
                 "sdk_protocol": "tinker 0.38.0", "server": f"lorafleet {__version__}"}
        prov = Provenance(base_fingerprint=self.base.fingerprint, parent=run.last_revision, method="tinker",
                          hyperparams=hyper, example_count=run.datums, creator=run.creator)
        rev = self.registry.commit(run.ref, data, prov, creator=run.creator, aliases=("candidate",), create=True)
        run.last_revision = rev.number
        run.checkpoints.append(Checkpoint(f"sampler_weights/{name}", "sampler", path, utcnow(), rev.size,
                                          revision=rev.number, digest=rev.digest,
                                          user_metadata=dict(op.payload.get("user_metadata") or {})))
        return {"path": path, "type": "save_weights_for_sampler"}

    # ------------------------------------------------------------------ checkpoints and sampling

    def find_checkpoint(self, key: ApiKey, path: str, kind: str) -> Checkpoint:
        """The checkpoint at ``tinker://<run>/<weights|sampler_weights>/<name>`` of one of the key's runs.

        Training checkpoints are files, so they are found again after a server restart (by the run's tenant).
        """
        prefix = "tinker://"
        parts = path[len(prefix):].split("/") if path.startswith(prefix) else []
        segment = {"sampler": "sampler_weights", "external": "external_weights"}.get(kind, "weights")
        if len(parts) != 3 or parts[1] != segment or not RUN_ID_RE.fullmatch(parts[0]):
            raise _user(f"path {path!r} is not a {kind} checkpoint path: expected 'tinker://<run>/{segment}/<name>'")
        run_id, name = parts[0], check_segment(parts[2], "checkpoint name")
        run = self.runs.get(run_id)
        if run is not None and (key.is_admin or run.tenant == key.tenant):
            ckpt = run.checkpoint(kind, name)
            if ckpt is not None:
                return ckpt
        elif run is None and kind == "external" and key.tenant is not None:
            folder = self.home / key.tenant / run_id / "external_weights" / name
            if folder.is_dir() and _external_sidecar(folder).is_file():
                size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
                return Checkpoint(f"external_weights/{name}", "external", path, utcnow(), size, file=str(folder))
        elif run is None and kind == "training" and key.tenant is not None:
            file = self.home / key.tenant / run_id / f"{name}.safetensors"
            if file.is_file():
                meta = _sidecar_metadata(file.with_suffix(".json"))
                return Checkpoint(f"weights/{name}", "training", path, utcnow(), file.stat().st_size, file=str(file),
                                  user_metadata=meta)
        raise TinkerNotFoundError(f"checkpoint {path!r} does not exist")

    def _new_sampler(self, tenant: str | None, model_path: str | None, digest: str | None, *,
                     ref: str | None = None, session_id: str | None = None) -> SamplerSession:
        sampler = SamplerSession(new_id("sampler"), tenant, self.base.name, model_path, digest, ref, session_id)
        with self._lock:
            self.samplers[sampler.sampler_id] = sampler
        return sampler

    def create_sampler(self, key: ApiKey, body: dict) -> SamplerSession:
        self.check_session(key, str(body.get("session_id", "")))
        sampler = self._resolve_sampler(key, body)
        sampler.session_id = str(body["session_id"])
        return sampler

    def _resolve_sampler(self, key: ApiKey, body: dict) -> SamplerSession:
        path = body.get("model_path")
        if not path:
            self.check_base(body.get("base_model") or self.base.name)
            return self._new_sampler(None, None, None)
        if str(path).startswith("tinker://"):
            ckpt = self.find_checkpoint(key, str(path), "sampler")  # also checks the run is this tenant's
            run = self.runs[str(path).split("/")[2]]
            return self._new_sampler(run.tenant, str(path), ckpt.digest, ref=run.ref)
        # A registry address (tenant/user/adapter, @alias or #N): sample any revision the key may use.
        addr = parse_address(str(path))
        if not key.is_admin and addr.tenant != key.tenant:
            raise TinkerNotFoundError(f"model_path {path!r} does not exist")
        rev = self.registry.resolve(str(path))
        return self._new_sampler(addr.tenant, str(path), rev.digest, ref=addr.ref)

    def sampler_of(self, key: ApiKey, sampler_id: str) -> SamplerSession:
        sampler = self.samplers.get(sampler_id)
        if sampler is None or not (sampler.tenant is None or key.is_admin or sampler.tenant == key.tenant):
            raise TinkerNotFoundError(f"sampling session {sampler_id!r} does not exist")
        return sampler

    def sample(self, key: ApiKey, body: dict) -> tuple[concurrent.futures.Future, int]:
        engine = self.service.engine
        if engine is None:
            raise _user("sampling needs the serving engine, and this server runs without one")
        if body.get("sampling_session_id"):
            sampler = self.sampler_of(key, str(body["sampling_session_id"]))
        elif body.get("model_path") or body.get("base_model"):
            sampler = self._resolve_sampler(key, body)  # a one-off sampler (no sampling session)
        else:
            raise _user("asample: give sampling_session_id (or model_path / base_model)")
        unsupported = [k for k in ("prompt_logprobs", "topk_prompt_logprobs", "topk_sample_logprobs",
                                   "target_prompt_logprobs", "prompt_alt_tokens_k") if body.get(k)]
        if unsupported:
            raise _user(f"asample: {unsupported} are not supported by lorafleet's sampler")
        limits = self.service.limits  # the same per-request limits as the OpenAI routes
        n = body.get("num_samples", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_samples:
            raise _user(f"num_samples must be an integer in 1..{limits.max_samples}, got {n!r}")
        chunks = (body.get("prompt") or {}).get("chunks") or []
        tokens = []
        for i, chunk in enumerate(chunks):
            if chunk.get("type", "encoded_text") != "encoded_text":
                raise _user(f"prompt.chunks[{i}]: {chunk.get('type')} chunks are not supported (text tokens only)")
            tokens.extend(int(t) for t in chunk.get("tokens", []))
        self._check_tokens(tokens, "prompt")
        if len(tokens) > limits.max_prompt_tokens:
            raise _user(f"prompt: {len(tokens)} tokens; this server's limit is {limits.max_prompt_tokens}")
        sp = body.get("sampling_params") or {}
        if (sp.get("top_k") or -1) > 0:
            raise _user("sampling_params.top_k is not supported by lorafleet's sampler (use top_p)")
        stop = sp.get("stop")
        stop_strs = (stop,) if isinstance(stop, str) else tuple(s for s in (stop or ()) if isinstance(s, str))
        stop_ids = {int(s) for s in (stop or ()) if isinstance(s, int) and not isinstance(stop, str)}
        max_tokens = sp.get("max_tokens") or 64
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.max_tokens:
            raise _user(f"sampling_params.max_tokens must be an integer in 1..{limits.max_tokens} (this server's "
                        f"limit per sequence), got {max_tokens!r}")
        try:
            params = [SamplingParams(temperature=float(sp.get("temperature", 1.0)), top_p=float(sp.get("top_p", 1.0)),
                                     max_tokens=int(max_tokens), stop=stop_strs,
                                     seed=None if sp.get("seed") is None else int(sp["seed"]) + i,
                                     ignore_eos=stop is not None and len(stop) == 0 and not isinstance(stop, str))
                      for i in range(n)]
        except ValueError as exc:
            raise _user(f"sampling_params: {exc}") from None
        handles = [engine.submit(tokens, sampler.digest, p) for p in params]
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def collect() -> None:
            try:
                seqs = []
                for h in handles:
                    res = h.result()
                    if res.error is not None:
                        raise RuntimeError(f"sampling failed: {res.error}")
                    ids, reason = list(res.token_ids), res.finish_reason
                    cut = next((i for i, t in enumerate(ids) if t in stop_ids), None)
                    if cut is not None:  # a stop token: keep it (as Tinker does) and end there
                        ids, reason = ids[: cut + 1], "stop"
                    seqs.append((ids, "length" if reason == "length" else "stop"))
                logprobs = self._sampled_logprobs(sampler.digest, tokens, [ids for ids, _ in seqs])
                fut.set_result(wire.encode_sample_response(
                    [(ids, reason, lp) for (ids, reason), lp in zip(seqs, logprobs, strict=True)]))
            except Exception as exc:  # noqa: BLE001 - reported through the future
                fut.set_exception(exc)

        threading.Thread(target=collect, name="lorafleet-tinker-sample", daemon=True).start()
        if sampler.ref is not None:
            self._future_refs[fut] = sampler.ref
        return fut, n

    @torch.no_grad()
    def _sampled_logprobs(self, digest: str | None, prompt: list[int], completions: list[list[int]]) -> list:
        """Log-probs (temperature 1) of each completion's tokens under the sampler's adapter: one padded forward.

        The engine does not report them; RL losses (importance_sampling) need them as the sampler's log-probs.
        """
        rows = [prompt + c for c in completions if c]
        if not rows:
            return [[] for _ in completions]
        with self._lock:
            adapter = self._adapters.get(digest) if digest is not None else None
        if digest is not None and adapter is None:
            adapter = from_bytes(self.registry.read_blob(digest), self.base)
            with self._lock:
                self._adapters[digest] = adapter
                while len(self._adapters) > 8:  # a few recent samplers' adapters, parsed
                    self._adapters.pop(next(iter(self._adapters)))
        logp = packed_forward(self.base, [adapter], [0] * len(rows), [row[:-1] for row in rows],
                              [row[1:] for row in rows], score=next_token_logprobs, pad_id=0, label_pad=0,
                              train=False).cpu()  # (n, T)
        out, r = [], 0
        for c in completions:
            if not c:
                out.append([])
                continue
            start = len(prompt) - 1  # position predicting the first completion token
            out.append(logp[r, start : start + len(c)].tolist())
            r += 1
        return out

    # ------------------------------------------------------------------ listing

    def list_runs(self, key: ApiKey, limit: int, offset: int) -> dict:
        runs = [r for r in self.runs.values() if key.is_admin or r.tenant == key.tenant]
        runs.sort(key=lambda r: r.created, reverse=True)
        return {"training_runs": [r.to_dict() for r in runs[offset: offset + limit]],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}

    # ------------------------------------------------------------------ forgetting a user (lorafleet.api.forget)

    def forget_user(self, tenant: str, user: str) -> tuple[dict, set[str]]:
        """Drop this process's state of ``tenant/user``'s adapters: their training runs (marked forgotten, so a
        save in flight refuses), sampling sessions, futures (their results hold the user's outputs) and the
        blobs of ephemeral samplers (returned, for the caller to delete). Checkpoint files: see
        :func:`forget_checkpoint_files` (under the same lock, so no save lands after it)."""
        mine = _owned_by(tenant, user)
        with self._persist_lock, self._lock:
            runs = [r for r in self.runs.values() if mine(r.ref)]
            for run in runs:
                run.forgotten = True
                del self.runs[run.run_id]
            samplers = [s for s in self.samplers.values() if s.ref is not None and mine(s.ref)]
            for s in samplers:
                del self.samplers[s.sampler_id]
            digests = {d for r in runs for d in r.ephemeral_digests}
            futures = {f for f, ref in list(self._future_refs.items()) if mine(ref)}
            files = forget_checkpoint_files(self.home, tenant, user)
        dropped = self.futures.drop(futures)
        return {"tinker_runs": len(runs), "tinker_samplers": len(samplers), "tinker_futures": dropped,
                "tinker_checkpoint_files": files}, digests

    def drop_cached(self, digests: set[str]) -> int:
        """Drop parsed adapters of these digests from the sampled-log-probs cache."""
        with self._lock:
            hit = [d for d in digests if d in self._adapters]
            for d in hit:
                del self._adapters[d]
        return len(hit)


URL_TTL_S = 3600  # external-weights download URLs stay valid this long


def _external_sidecar(folder: Path) -> Path:
    """``<run>/external_weights/<name>.json`` beside the ``<name>/`` folder of a save_weights_external."""
    return folder.with_name(folder.name + ".json")


def _project(tenant: str | None) -> str:
    return tenant or "admin"


def _sidecar_metadata(sidecar: Path) -> dict[str, str]:
    """The client's user_metadata stored in a training checkpoint's ``<name>.json`` (empty for older sidecars)."""
    try:
        meta = json.loads(sidecar.read_text()).get("user_metadata") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def default_home() -> Path:
    """Where training checkpoints (``save_state``) live: ``$LORAFLEET_HOME/tinker``."""

    return data_dir() / "tinker"


def _owned_by(tenant: str, user: str):
    prefix = f"{tenant}/{user}/"
    return lambda ref: isinstance(ref, str) and ref.startswith(prefix)


def forget_checkpoint_files(home: Path, tenant: str, user: str) -> int:
    """Delete every training checkpoint under ``home/<tenant>/<run>/`` whose sidecar names one of
    ``tenant/user``'s adapters (``<name>.json`` + ``<name>.safetensors`` + a crash's ``<name>.tmp``), every
    external-weights folder likewise (``external_weights/<name>.json`` + ``external_weights/<name>/``), and the
    run folders left empty. Works without a server (the files outlive the process). Returns the files deleted."""
    mine = _owned_by(tenant, user)
    folder = Path(home) / tenant
    if not folder.is_dir():
        return 0
    deleted = 0
    for sidecar in sorted(folder.glob("*/*.json")):
        try:
            ref = json.loads(sidecar.read_text()).get("ref")
        except (OSError, ValueError, AttributeError):
            continue  # not a checkpoint sidecar of ours
        if not mine(ref):
            continue
        for suffix in (".safetensors", ".tmp", ".json"):
            path = sidecar.with_suffix(suffix)
            if path.exists():
                path.unlink()
                deleted += 1
        with contextlib.suppress(OSError):
            sidecar.parent.rmdir()  # only when empty: another user's checkpoints in the run stay
    for sidecar in sorted(folder.glob("*/external_weights/*.json")):  # save_weights_external folders
        try:
            ref = json.loads(sidecar.read_text()).get("ref")
        except (OSError, ValueError, AttributeError):
            continue
        if not mine(ref):
            continue
        files = sidecar.with_name(sidecar.name[: -len(".json")])
        if files.is_dir():
            deleted += sum(1 for p in files.rglob("*") if p.is_file())
            shutil.rmtree(files)
        sidecar.unlink()
        deleted += 1
        for empty in (sidecar.parent, sidecar.parent.parent):
            with contextlib.suppress(OSError):
                empty.rmdir()
    return deleted
