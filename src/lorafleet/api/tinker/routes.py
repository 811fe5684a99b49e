"""HTTP routes of the Tinker-compatible service under ``/api/v1`` (the official ``tinker`` SDK's paths).

Auth: the SDK sends its API key as ``X-API-Key`` and insists that it starts with ``tml-``; a lorafleet tenant
key ``lf-acme-…`` is therefore given to the SDK as ``TINKER_API_KEY=tml-lf-acme-…`` and the prefix is
dropped here. ``Authorization: Bearer lf-…`` works too (curl). A key reaches only its tenant's runs.

Long-running calls answer a future ``{"request_id"}`` at once; the SDK polls ``retrieve_future``, which
holds the request until the result is ready (long poll) or answers ``try_again``. forward_backward bodies
and the results of forward_backward and sample are protobuf (:mod:`.wire`); everything else is JSON.
"""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters import AdapterError
from lorafleet.api.errors import ApiError
from lorafleet.api.keys import ApiKey
from lorafleet.api.tinker import requests as rq
from lorafleet.api.tinker import wire
from lorafleet.api.tinker.core import TinkerService
from lorafleet.api.tinker.state import TinkerNotFoundError, TinkerUserError, wait_for

router = APIRouter(prefix="/api/v1", tags=["tinker"])
PROTO = "application/x-protobuf"
TINKER_PREFIX = "tml-"
_init_lock = threading.Lock()


def tinker_of(request: Request) -> TinkerService:
    """The app's :class:`TinkerService`, created on first use (the app factory stays untouched)."""
    state = request.app.state
    if getattr(state, "tinker", None) is None:
        with _init_lock:
            if getattr(state, "tinker", None) is None:
                state.tinker = TinkerService(state.service)
    state.tinker.start()
    return state.tinker


def tinker_key(request: Request) -> ApiKey:
    secret = request.headers.get("x-api-key", "").strip()
    if not secret:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        secret = token.strip() if scheme.lower() == "bearer" else ""
    if not secret:
        raise ApiError(401, "missing API key: set TINKER_API_KEY=tml-<your lorafleet key> (sent as X-API-Key)",
                       type_="authentication_error", code="missing_api_key")
    if secret.startswith(TINKER_PREFIX):
        secret = secret[len(TINKER_PREFIX):]
    key = request.app.state.service.keys.verify(secret)
    if key is None:
        raise ApiError(401, "invalid or revoked API key (the Tinker SDK needs 'tml-' + a lorafleet key)",
                       type_="authentication_error", code="invalid_api_key")
    return key


Key = Annotated[ApiKey, Depends(tinker_key)]
Tinker = Annotated[TinkerService, Depends(tinker_of)]


async def _body(request: Request, model: type[rq.Body]) -> dict:
    """The request's JSON body, validated against its typed shape (a 400 naming the field otherwise)."""
    route, raw = request.url.path, await request.body()
    # Parsing and validating up to max_body_bytes of JSON (a million token ids) runs off the event loop.
    return await run_in_threadpool(lambda: rq.validate(model, rq.parse_json(raw, route), route))


async def _optional_body(request: Request, model: type[rq.Body]) -> dict:
    """Like :func:`_body`, but an empty body is the model's defaults (curl users may send none)."""
    raw = await request.body()
    return await _body(request, model) if raw.strip() else {}


def _call(fn, *args):
    """Run a service call, turning its errors into HTTP errors that name the problem (4xx is never retried)."""
    try:
        return fn(*args)
    except TinkerUserError as exc:
        raise ApiError(400, str(exc), code="invalid_request") from None
    except TinkerNotFoundError as exc:
        raise ApiError(404, str(exc), type_="not_found_error", code="not_found") from None


def _future(tinker: TinkerService, fut, key: ApiKey, *, proto: bool = False, **extra) -> dict:
    return {"request_id": tinker.futures.add(fut, tenant=key.tenant, proto=proto), **extra}


# ------------------------------------------------------------------------------ service


@router.get("/healthz", summary="Liveness (no key needed)")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/get_server_capabilities", summary="The base model this server trains and samples")
def capabilities(_: Key, tinker: Tinker) -> dict:
    return tinker.capabilities()


@router.post("/client/config", summary="Client feature flags")
def client_config(_: Key) -> dict:
    # Plain HTTP/1.1 transport, uncompressed protobuf forward_backward, per-request retrieve_future polling.
    return {"use_pyqwest_transport": False, "proto_compress_fwdbwd": False, "sample_use_retrieve_futures": False,
            "sample_join_sampling_session": False, "custom_loss_server_side": False, "pjwt_auth_enabled": False}


@router.post("/client/dynamic_config", summary="Periodically refreshed client flags (none)")
def dynamic_config(_: Key) -> dict:
    return {}


@router.post("/telemetry", summary="SDK telemetry (accepted and dropped)")
def telemetry(_: Key) -> dict:
    return {"status": "accepted"}


@router.post("/create_session", summary="Start a session", openapi_extra=rq.openapi_body(rq.CreateSession),
             responses=rq.documented(rq.SessionOut))
async def create_session(request: Request, key: Key, tinker: Tinker) -> dict:
    session_id = _call(tinker.create_session, key, await _optional_body(request, rq.CreateSession))
    return {"type": "create_session", "session_id": session_id,
            "info_message": f"lorafleet: training {tinker.base.name} adapters for tenant {key.tenant or '(admin)'}"}


@router.post("/session_heartbeat", summary="Keep a session alive",
             openapi_extra=rq.openapi_body(rq.SessionRef), responses=rq.documented(rq.HeartbeatOut))
async def heartbeat(request: Request, key: Key, tinker: Tinker) -> dict:
    _call(lambda sid: tinker.check_session(key, sid, live=False), (await _body(request, rq.SessionRef))["session_id"])
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish", summary="End a session (runs and checkpoints stay)",
             openapi_extra=rq.openapi_body(rq.FinishSession))
async def finish_session(session_id: str, request: Request, key: Key, tinker: Tinker) -> dict:
    _call(tinker.finish_session, key, session_id, await _optional_body(request, rq.FinishSession))
    return {}


@router.get("/sessions", summary="This tenant's session ids, newest first", responses=rq.documented(rq.SessionsOut))
def list_sessions(key: Key, tinker: Tinker, limit: int = Query(20, ge=1, le=1000), offset: int = Query(0, ge=0),
                  access_scope: str = Query("owned", pattern="^(owned|accessible)$")) -> dict:
    return tinker.list_sessions(key, limit, offset)  # a tenant key sees its own tenant's sessions either way


@router.get("/sessions/{session_id}", summary="A session's training runs and samplers",
            responses=rq.documented(rq.SessionInfoOut))
def get_session(session_id: str, key: Key, tinker: Tinker,
                access_scope: str = Query("owned", pattern="^(owned|accessible)$")) -> dict:
    return _call(tinker.get_session, key, session_id)


@router.post("/weights_info", summary="Base, rank and targets of a checkpoint",
             openapi_extra=rq.openapi_body(rq.WeightsInfo), responses=rq.documented(rq.WeightsInfoOut))
async def weights_info(request: Request, key: Key, tinker: Tinker) -> dict:
    return _call(tinker.weights_info, key, (await _body(request, rq.WeightsInfo))["tinker_path"])


@router.post("/sessions/search", summary="Search this tenant's sessions by user_metadata, name, id, status",
             openapi_extra=rq.openapi_body(rq.SessionSearch), responses=rq.documented(rq.SessionSearchOut))
async def search_sessions(request: Request, key: Key, tinker: Tinker) -> dict:
    return _call(tinker.search_sessions, key, await _body(request, rq.SessionSearch))


# ------------------------------------------------------------------------------ training


@router.post("/create_model", summary="Create a LoRA training run on the server's base (a future)",
             openapi_extra=rq.openapi_body(rq.CreateModel), responses=rq.documented(rq.CreateModelOut))
async def create_model(request: Request, key: Key, tinker: Tinker) -> dict:
    run = await run_in_threadpool(_call, tinker.create_model, key, await _body(request, rq.CreateModel))
    return {"request_id": tinker.futures.done({"model_id": run.run_id, "type": "create_model"}, tenant=key.tenant),
            "model_id": run.run_id}


@router.post("/get_info", summary="A training run's model info",
             openapi_extra=rq.openapi_body(rq.ModelRef), responses=rq.documented(rq.InfoOut))
async def get_info(request: Request, key: Key, tinker: Tinker) -> dict:
    run = _call(tinker.run_of, key, (await _body(request, rq.ModelRef))["model_id"])
    return tinker.info(run)


@router.post("/forward_backward", summary="Forward + backward on a batch (protobuf body; a future)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 PROTO: {"schema": {"type": "string", "format": "binary"}}}}}, responses=rq.documented(rq.Future))
async def forward_backward(request: Request, key: Key, tinker: Tinker) -> dict:
    if PROTO not in request.headers.get("content-type", ""):
        raise ApiError(415, "forward_backward takes a tinker_public.ForwardBackwardRequest protobuf body "
                            f"(Content-Type: {PROTO}), as the tinker SDK sends it", code="unsupported_media_type")
    if request.headers.get("content-encoding"):
        raise ApiError(415, "compressed forward_backward bodies are not supported (the server's client config "
                            "turns compression off)", code="unsupported_media_type")
    try:
        decoded = wire.decode_forward_backward(await request.body())
    except wire.WireError as exc:
        raise ApiError(400, str(exc), code="invalid_request") from None
    fut = _call(tinker.forward_backward, key, decoded)
    return _future(tinker, fut, key, proto=True, model_id=decoded["model_id"])


@router.post("/optim_step", summary="An AdamW step with the given parameters (a future)",
             openapi_extra=rq.openapi_body(rq.OptimStep), responses=rq.documented(rq.Future))
async def optim_step(request: Request, key: Key, tinker: Tinker) -> dict:
    body = await _body(request, rq.OptimStep)
    return _future(tinker, _call(tinker.optim_step, key, body), key, model_id=body.get("model_id"))


@router.post("/save_weights", summary="save_state: weights + optimizer to a training checkpoint (a future)",
             openapi_extra=rq.openapi_body(rq.SaveWeights), responses=rq.documented(rq.Future))
async def save_weights(request: Request, key: Key, tinker: Tinker) -> dict:
    body = await _body(request, rq.SaveWeights)
    return _future(tinker, _call(lambda: tinker.save(key, body, sampler=False)), key, model_id=body.get("model_id"))


@router.post("/save_weights_for_sampler", summary="Sampler weights: a new registry revision (a future)",
             openapi_extra=rq.openapi_body(rq.SaveWeights), responses=rq.documented(rq.Future))
async def save_weights_for_sampler(request: Request, key: Key, tinker: Tinker) -> dict:
    body = await _body(request, rq.SaveWeights)
    fut = _call(lambda: tinker.save(key, body, sampler=True))
    return _future(tinker, fut, key, model_id=body.get("model_id"))


@router.post("/save_weights_external", summary="The weights as a PEFT folder, downloadable (a future)",
             openapi_extra=rq.openapi_body(rq.SaveWeightsExternal), responses=rq.documented(rq.Future))
async def save_weights_external(request: Request, key: Key, tinker: Tinker) -> dict:
    body = await _body(request, rq.SaveWeightsExternal)
    return _future(tinker, _call(tinker.save_external, key, body), key, model_id=body.get("model_id"))


@router.post("/load_weights", summary="load_state, or a new run from a training checkpoint (a future)",
             openapi_extra=rq.openapi_body(rq.LoadWeights), responses=rq.documented(rq.Future))
async def load_weights(request: Request, key: Key, tinker: Tinker) -> dict:
    fut, run_id = _call(tinker.load, key, await _body(request, rq.LoadWeights))
    return _future(tinker, fut, key, model_id=run_id)


# ------------------------------------------------------------------------------ sampling


@router.post("/create_sampling_session", summary="A sampler over a checkpoint, a registry address or the base",
             openapi_extra=rq.openapi_body(rq.CreateSamplingSession), responses=rq.documented(rq.SamplingSessionOut))
async def create_sampling_session(request: Request, key: Key, tinker: Tinker) -> dict:
    sampler = await run_in_threadpool(_call, tinker.create_sampler, key,
                                      await _body(request, rq.CreateSamplingSession))
    return {"type": "create_sampling_session", "sampling_session_id": sampler.sampler_id}


@router.get("/samplers/{sampler_id}", summary="A sampling session")
def get_sampler(sampler_id: str, key: Key, tinker: Tinker) -> dict:
    s = _call(tinker.sampler_of, key, sampler_id)
    return {"sampler_id": s.sampler_id, "base_model": s.base_model, "model_path": s.model_path}


@router.post("/asample", summary="Sample completions through the serving engine (a future)",
             openapi_extra=rq.openapi_body(rq.Sample), responses=rq.documented(rq.SampleOut))
async def asample(request: Request, key: Key, tinker: Tinker) -> dict:
    fut, n = await run_in_threadpool(_call, tinker.sample, key, await _body(request, rq.Sample))
    request_id = tinker.futures.add(fut, tenant=key.tenant, proto=True)
    return {"request_id": request_id, "sample_sequence_ids": [f"{request_id}:{i}" for i in range(n)]}


# ------------------------------------------------------------------------------ futures


@router.post("/retrieve_future", summary="A future's result; long-polls while it is pending",
             openapi_extra=rq.openapi_body(rq.FutureRef))
async def retrieve_future(request: Request, key: Key, tinker: Tinker):
    request_id = (await _body(request, rq.FutureRef))["request_id"]
    pending = tinker.futures.get(request_id)
    if pending is None or not (key.is_admin or pending.tenant == key.tenant):
        raise ApiError(404, f"future {request_id!r} does not exist (or has expired)", type_="not_found_error",
                       code="not_found")
    if not await wait_for(pending.future, tinker.config.long_poll_s):
        return {"type": "try_again", "request_id": request_id, "queue_state": "active"}
    exc = pending.future.exception()
    if exc is not None:
        user = isinstance(exc, TinkerUserError | AdapterError)
        return {"error": str(exc), "category": "user" if user else "server"}
    result = pending.future.result()
    if pending.proto:
        return Response(content=result, media_type=PROTO)
    return JSONResponse(result)


# ------------------------------------------------------------------------------ runs and checkpoints


@router.get("/training_runs", summary="This tenant's training runs (this server process)")
def training_runs(key: Key, tinker: Tinker, limit: int = Query(20, ge=1, le=1000),
                  offset: int = Query(0, ge=0)) -> dict:
    return tinker.list_runs(key, limit, offset)


@router.get("/training_runs/{run_id}", summary="One training run")
def training_run(run_id: str, key: Key, tinker: Tinker) -> dict:
    return _call(tinker.run_of, key, run_id).to_dict()


@router.get("/training_runs/{run_id}/checkpoints", summary="A run's checkpoints")
def run_checkpoints(run_id: str, key: Key, tinker: Tinker) -> dict:
    run = _call(tinker.run_of, key, run_id)
    return {"checkpoints": [c.to_dict() for c in run.checkpoints], "cursor": None}


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls",
            summary="Signed download URLs of an external-weights checkpoint's files",
            responses=rq.documented(rq.ExternalUrlsOut))
def external_weights_urls(run_id: str, checkpoint_id: str, request: Request, key: Key, tinker: Tinker) -> dict:
    return _call(tinker.external_urls, key, run_id, checkpoint_id, str(request.base_url))


@router.get("/external_weights_files/{token}", summary="One file of an external-weights checkpoint (signed URL)")
def external_weights_file(token: str, request: Request) -> FileResponse:
    # No key: the URL is the credential (signed by this server, expiring), as Tinker's signed URLs are.
    file = _call(tinker_of(request).signed_file, token)
    return FileResponse(file, media_type="application/octet-stream", filename=file.name)


@router.get("/checkpoints", summary="Every checkpoint of this tenant's runs")
def user_checkpoints(key: Key, tinker: Tinker, limit: int = Query(100, ge=1, le=1000),
                     offset: int = Query(0, ge=0)) -> dict:
    runs = [r for r in tinker.runs.values() if key.is_admin or r.tenant == key.tenant]
    items = sorted((c for r in runs for c in r.checkpoints), key=lambda c: c.time, reverse=True)
    return {"checkpoints": [c.to_dict() for c in items[offset: offset + limit]],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(items)}}


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
def unsupported(path: str, request: Request) -> None:
    raise ApiError(404, f"the Tinker endpoint '{request.method} /api/v1/{path}' is not supported by this lorafleet "
                        "server (see docs/tinker.md for the supported subset)", type_="not_found_error",
                   code="unsupported_endpoint")
