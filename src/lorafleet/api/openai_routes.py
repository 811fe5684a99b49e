"""OpenAI-compatible inference: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

``model`` names a personal adapter — ``tenant/user/adapter`` (its ``live`` revision), ``...@alias``,
``...#N`` — or the base model's name for no adapter. A key only reaches its own tenant's adapters: any
other tenant's adapter answers 404 exactly like one that does not exist, resident or not.

A stacked adapter (``lorafleet adapters create ... --parent``) is served with every level of its stack: the
requested revision plus each parent's ``live`` revision. The response's ``lorafleet`` field names every
revision used (``stack``: address + digest per level, root first); streams carry it in every chunk and in the
``x-lorafleet-stack`` header.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from lorafleet.api.auth import can_use, current_key
from lorafleet.api.errors import ApiError, error_body
from lorafleet.api.feedback import capture
from lorafleet.api.keys import ApiKey
from lorafleet.registry import NotFoundError
from lorafleet.registry.errors import InvalidNameError
from lorafleet.registry.names import parse_address
from lorafleet.serving.params import SamplingParams

router = APIRouter(prefix="/v1", tags=["openai"])
Key = Annotated[ApiKey, Depends(current_key)]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=200_000)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model: str = Field(..., min_length=1, max_length=300)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = Field(None, max_length=256)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)


class CompletionRequest(_Sampling):
    prompt: str = Field(..., min_length=1, max_length=200_000)


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` resolved to."""

    model: str
    digest: str | None  # None = the base alone
    revision: str | None  # tenant/user/adapter#N
    stack: tuple[tuple[str, str], ...] = ()  # (address, digest) of every level applied, root first

    @property
    def adapter(self) -> tuple[str, ...]:
        """What the engine is given: the digests of the stack's levels, root first (``()`` for the base)."""
        return tuple(d for _, d in self.stack)

    def metadata(self) -> dict:
        return {"revision": self.revision, "digest": self.digest,
                "stack": [{"address": a, "digest": d} for a, d in self.stack]}


def resolve_model(request: Request, key: ApiKey, model: str) -> Target:
    svc = request.app.state.service
    if model in (svc.base.name, "base"):
        return Target(model, None, None)
    missing = ApiError(404, f"The model '{model}' does not exist or you do not have access to it.",
                       code="model_not_found", param="model")
    try:
        addr = parse_address(model)
    except InvalidNameError:
        raise missing from None
    if not can_use(key, addr.tenant):
        raise missing  # the same answer as a missing adapter: existence does not leak across tenants
    try:
        revs = svc.registry.resolve_stack(model)
    except NotFoundError:
        raise missing from None
    for rev in revs:
        if rev.provenance.base_fingerprint != svc.base.fingerprint:
            raise ApiError(422, f"revision {rev.address} was made for another base model and cannot be served here",
                           code="base_mismatch", param="model")
    top = revs[-1]
    return Target(model, top.digest, top.address, tuple((r.address, r.digest) for r in revs))


def _sampling(svc, body: _Sampling):
    max_tokens = body.max_completion_tokens or body.max_tokens or 256
    if max_tokens > svc.limits.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {svc.limits.max_tokens}",
                       param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop) or any(len(s) > 200 for s in stop):
        raise ApiError(400, "stop must be up to 4 non-empty strings of at most 200 characters", param="stop")
    return SamplingParams(temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens, stop=tuple(stop),
                          seed=body.seed)


def _submit(request: Request, target: Target, prompt, body: _Sampling):
    svc = request.app.state.service
    if svc.engine is None:
        raise ApiError(503, "this server has no inference engine attached", type_="server_error")
    try:
        return svc.engine.submit(prompt, target.adapter, _sampling(svc, body),
                                 request_id=f"req-{uuid.uuid4().hex[:24]}")
    except ValueError as exc:  # a prompt too long, empty, ...
        raise ApiError(400, str(exc), param="messages" if isinstance(prompt, list) else "prompt") from exc


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _failed(result) -> ApiError:
    return ApiError(500, f"generation failed: {result.error}", type_="server_error", code="generation_failed")


def _stream(request: Request, handle, target: Target, kind: str, include_usage: bool, prompt) -> StreamingResponse:
    created, rid = int(time.time()), handle.id
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
        if kind == "chat":
            d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return _sse({"id": rid, "object": obj, "created": created, "model": target.model, "choices": [choice],
                     "lorafleet": {"revision": target.revision, "stack": meta["stack"]}})

    meta = target.metadata()

    async def events():
        if kind == "chat":
            yield chunk(None, None, first=True)
        try:
            async for delta in iterate_in_threadpool(iter(handle)):
                if await request.is_disconnected():
                    handle.cancel()
                    return
                yield chunk(delta, None)
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band, OpenAI style
            yield _sse(error_body(f"generation failed: {exc}", "server_error", "generation_failed"))
            yield "data: [DONE]\n\n"
            return
        result = await run_in_threadpool(handle.result)
        if result.error is None:
            await run_in_threadpool(capture, request, target, prompt, result.text, rid, kind)
        yield chunk(None, result.finish_reason)
        if include_usage:
            yield _sse({"id": rid, "object": obj, "created": created, "model": target.model, "choices": [],
                        "usage": _usage(result)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-lorafleet-revision": target.revision or "base",
                                      "x-lorafleet-stack": ",".join(a for a, _ in target.stack) or "base"})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@router.post("/chat/completions", summary="Chat completion through a personal model (OpenAI-compatible)")
async def chat_completions(body: ChatRequest, request: Request, key: Key):
    target = await run_in_threadpool(resolve_model, request, key, body.model)
    messages = [m.model_dump() for m in body.messages]
    handle = _submit(request, target, messages, body)
    if body.stream:
        return _stream(request, handle, target, "chat", bool(body.stream_options and body.stream_options.include_usage),
                       messages)
    result = await run_in_threadpool(handle.result)
    if result.error is not None:
        raise _failed(result)
    await run_in_threadpool(capture, request, target, messages, result.text, result.request_id, "chat")
    return {"id": result.request_id, "object": "chat.completion", "created": int(time.time()), "model": target.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": _usage(result), "lorafleet": target.metadata()}


@router.post("/completions", summary="Text completion through a personal model (OpenAI-compatible)")
async def completions(body: CompletionRequest, request: Request, key: Key):
    target = await run_in_threadpool(resolve_model, request, key, body.model)
    handle = _submit(request, target, body.prompt, body)
    if body.stream:
        return _stream(request, handle, target, "completion",
                       bool(body.stream_options and body.stream_options.include_usage), body.prompt)
    result = await run_in_threadpool(handle.result)
    if result.error is not None:
        raise _failed(result)
    await run_in_threadpool(capture, request, target, body.prompt, result.text, result.request_id, "completion")
    return {"id": result.request_id, "object": "text_completion", "created": int(time.time()), "model": target.model,
            "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": _usage(result), "lorafleet": target.metadata()}


@router.get("/models", summary="Models this key can use: the base and its tenant's adapters")
def list_models(request: Request, key: Key, limit: int = Query(1000, ge=1, le=10_000)) -> dict:
    svc = request.app.state.service
    data = [{"id": svc.base.name, "object": "model", "created": 0, "owned_by": "lorafleet"}]
    cursor, left = None, max(1, min(limit, 10_000))
    while left > 0:
        items, cursor = svc.registry.list_adapters(tenant=None if key.is_admin else key.tenant, limit=min(left, 1000),
                                                   cursor=cursor)
        for a in items:
            if "live" in a.aliases:
                data.append({"id": a.ref, "object": "model", "created": int(a.created_at.timestamp()),
                             "owned_by": a.tenant})
        left -= len(items)
        if cursor is None:
            break
    return {"object": "list", "data": data}
