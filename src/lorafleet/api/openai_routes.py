"""OpenAI-compatible inference: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

``model`` names a personal adapter — ``tenant/user/adapter`` (its ``live`` revision), ``...@alias``,
``...#N``, or a bare vLLM-style lora name (``sql-lora`` = ``local/lora/sql-lora``) — or the base model's name for
no adapter. A key only reaches its own tenant's adapters: any
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
from dataclasses import dataclass, replace
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from lorafleet.api.auth import can_use, current_key
from lorafleet.api.errors import ApiError, error_body
from lorafleet.api.feedback import capture
from lorafleet.api.keys import ApiKey
from lorafleet.api.structured import ToolPlan, parse_tool_calls, response_grammar, tool_plan
from lorafleet.registry import NotFoundError
from lorafleet.registry.errors import InvalidNameError
from lorafleet.registry.imports import DEFAULT_PREFIX
from lorafleet.registry.names import parse_address
from lorafleet.serving.chat import chat_prompt_ids
from lorafleet.serving.params import SamplingParams

router = APIRouter(prefix="/v1", tags=["openai"])
Key = Annotated[ApiKey, Depends(current_key)]


class ToolCallFunction(BaseModel):
    name: str = Field(..., min_length=1, max_length=64)
    arguments: str = Field(..., max_length=200_000)  # a JSON object, as a string (OpenAI's shape)


class MessageToolCall(BaseModel):
    id: str = Field(..., min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """One turn. ``content`` may be null only on an assistant turn with ``tool_calls``; a ``tool`` turn answers
    the call named by ``tool_call_id``."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = Field(None, max_length=200_000)
    name: str | None = Field(None, max_length=64)
    tool_calls: list[MessageToolCall] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (null only on an assistant message with tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls belong on assistant messages only")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        for call in self.tool_calls or ():
            try:
                args = json.loads(call.function.arguments)
            except ValueError:
                args = None
            if not isinstance(args, dict):
                raise ValueError(f"tool_calls: the arguments of call {call.id!r} must be a JSON object as a string")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


MAX_N = 8  # completions per request (n)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions allow 5


class _Sampling(BaseModel):
    """OpenAI request fields. Every field lorafleet does not implement is refused (400 naming it), never ignored:
    unknown fields by ``extra="forbid"``, known ones at a non-default value by :meth:`refuse_unsupported`."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=300)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = Field(None, max_length=256)
    # Accepted only at their no-op value (what some clients send by default).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name} is not supported by this server (only 0)", param=name,
                               code="unsupported_parameter")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias",
                           code="unsupported_parameter")
        if self.stream and self.n > 1:
            raise ApiError(400, "n > 1 is not supported with stream=true; stream one completion per request",
                           param="n", code="unsupported_parameter")
        if self.stream and self.top_logprobs_wanted() is not None:
            raise ApiError(400, "logprobs are not supported with stream=true", param="logprobs",
                           code="unsupported_parameter")

        if self.max_tokens is not None and self.max_completion_tokens not in (None, self.max_tokens):
            raise ApiError(400, f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                                f"({self.max_completion_tokens}) disagree; give one (they are aliases)",
                           param="max_completion_tokens")

    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives per token to report; None = no logprobs."""
        return None

    def structure(self) -> tuple[str | None, ToolPlan | None]:
        """The grammar the output is held to (None: free) and the tools in play (None: none)."""
        return None, None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if self.stream and self.tools and self.tool_choice != "none":
            raise ApiError(400, "stream=true with tools is not supported by this server (tool calls are parsed from "
                                "the whole output); send stream=false, or tool_choice='none'", param="stream",
                           code="unsupported_parameter")

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def structure(self) -> tuple[str | None, ToolPlan | None]:
        grammar = response_grammar(self.response_format)
        plan = tool_plan(self.tools, self.tool_choice, self.parallel_tool_calls)
        if plan is not None and plan.grammar is not None:
            if grammar is not None:
                raise ApiError(400, f"response_format {self.response_format['type']!r} cannot be combined with "
                                    f"tool_choice {self.tool_choice!r} (both constrain the whole output)",
                               param="response_format")
            grammar = plan.grammar
        return grammar, plan


class CompletionRequest(_Sampling):
    prompt: str = Field(..., min_length=1, max_length=200_000)
    logprobs: int | None = Field(None, ge=0, le=5)

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


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
    address = model if "/" in model else f"{DEFAULT_PREFIX}/{model}"  # a bare vLLM-style lora name
    try:
        addr = parse_address(address)
    except InvalidNameError:
        raise missing from None
    if not can_use(key, addr.tenant):
        raise missing  # the same answer as a missing adapter: existence does not leak across tenants
    try:
        revs = svc.registry.resolve_stack(address)
    except NotFoundError:
        raise missing from None
    for rev in revs:
        if rev.provenance.base_fingerprint != svc.base.fingerprint:
            raise ApiError(422, f"revision {rev.address} was made for another base model and cannot be served here",
                           code="base_mismatch", param="model")
    top = revs[-1]
    return Target(model, top.digest, top.address, tuple((r.address, r.digest) for r in revs))


def _sampling(svc, body: _Sampling, grammar: str | None = None):
    max_tokens = body.max_completion_tokens or body.max_tokens or 256
    if max_tokens > svc.limits.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {svc.limits.max_tokens}",
                       param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop) or any(len(s) > 200 for s in stop):
        raise ApiError(400, "stop must be up to 4 non-empty strings of at most 200 characters", param="stop")
    return SamplingParams(temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens, stop=tuple(stop),
                          seed=body.seed, grammar=grammar)


def prompt_ids(svc, prompt: str | list[dict], param: str, tools: list[dict] | None = None) -> list[int]:
    """The prompt's token ids within the server's limits: characters are counted first (no tokenizer runs on an
    oversized prompt), then the chat template and the tokenizer run and the tokens are counted. Blocking: call it
    off the event loop."""
    limits = svc.limits
    chars = len(prompt) if isinstance(prompt, str) else sum(
        len(m.get("content") or "") + sum(len(c["function"]["arguments"]) for c in m.get("tool_calls") or ())
        for m in prompt) + (len(json.dumps(tools)) if tools else 0)
    if chars > limits.max_prompt_chars:
        raise ApiError(400, f"the prompt has {chars} characters; this server takes at most {limits.max_prompt_chars} "
                            f"characters and {limits.max_prompt_tokens} tokens", code="prompt_too_long", param=param)
    tok = svc.base.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else \
        chat_prompt_ids(tok, prompt, tools=tools)
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this server's limit is {limits.max_prompt_tokens}",
                       code="prompt_too_long", param=param)
    return ids


def _submit(request: Request, target: Target, prompt, body: _Sampling) -> tuple[list[int], list, ToolPlan | None]:
    """Check the limits, tokenize and queue one engine request per choice (``n``); with a ``seed``, choice ``i``
    uses ``seed + i``. Returns the prompt's token ids, the handles and the tools in play. Blocking: the routes run
    it in the thread pool."""
    svc = request.app.state.service
    body.refuse_unsupported()
    if svc.engine is None:
        raise ApiError(503, "this server has no inference engine attached", type_="server_error")
    param = "messages" if isinstance(prompt, list) else "prompt"
    grammar, plan = body.structure()
    sampling = _sampling(svc, body, grammar)
    ids = prompt_ids(svc, prompt, param, plan.tools if plan is not None else None)
    handles = []
    try:
        for i in range(body.n):
            params = sampling if body.seed is None or i == 0 else replace(sampling, seed=body.seed + i)
            handles.append(svc.engine.submit(ids, target.adapter, params,
                                             request_id=f"req-{uuid.uuid4().hex[:24]}"))
    except ValueError as exc:  # a prompt too long for the context, empty, ...
        for h in handles:
            h.cancel()
        raise ApiError(400, str(exc), param=param) from exc
    return ids, handles, plan


def _results(handles) -> list:
    results = [h.result() for h in handles]
    for r in results:
        if r.error is not None:
            raise _failed(r)
    return results


def _logprobs(request: Request, target: Target, ids: list[int], body: _Sampling, result, kind: str):
    top = body.top_logprobs_wanted()
    if top is None:
        return None
    from lorafleet.api import logprobs as lp  # noqa: PLC0415 - defers torch

    svc = request.app.state.service
    tokens = lp.returned_tokens(svc.base.tokenizer, list(result.token_ids), result.text)
    entries = lp.token_logprobs(svc, tuple(d for _, d in target.stack), ids, tokens, top)
    return lp.chat_logprobs(svc, entries) if kind == "chat" else lp.completion_logprobs(svc, entries)


def _usage_all(results) -> dict:
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": results[0].prompt_tokens, "completion_tokens": completion,
            "total_tokens": results[0].prompt_tokens + completion}


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _failed(result) -> ApiError:
    from lorafleet.serving.engine import NONFINITE  # noqa: PLC0415 - defers torch

    code = "non_finite_logits" if (result.error or "").startswith(NONFINITE) else "generation_failed"
    return ApiError(500, f"generation failed: {result.error}", type_="server_error", code=code)


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
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    ids, handles, plan = await run_in_threadpool(_submit, request, target, messages, body)
    if body.stream:
        return _stream(request, handles[0], target, "chat",
                       bool(body.stream_options and body.stream_options.include_usage), messages)
    results = await run_in_threadpool(_results, handles)
    await run_in_threadpool(capture, request, target, messages, results[0].text, results[0].request_id, "chat")
    choices = []
    for i, result in enumerate(results):
        logprobs = await run_in_threadpool(_logprobs, request, target, ids, body, result, "chat")
        message, finish = {"role": "assistant", "content": result.text}, result.finish_reason
        parsed = None if plan is None or finish == "length" else parse_tool_calls(result.text, plan)
        if parsed is not None:
            message, finish = {"role": "assistant", "content": parsed[0], "tool_calls": parsed[1]}, "tool_calls"
        choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": logprobs})
    return {"id": results[0].request_id, "object": "chat.completion", "created": int(time.time()),
            "model": target.model, "choices": choices, "usage": _usage_all(results), "lorafleet": target.metadata()}


@router.post("/completions", summary="Text completion through a personal model (OpenAI-compatible)")
async def completions(body: CompletionRequest, request: Request, key: Key):
    target = await run_in_threadpool(resolve_model, request, key, body.model)
    ids, handles, _ = await run_in_threadpool(_submit, request, target, body.prompt, body)
    if body.stream:
        return _stream(request, handles[0], target, "completion",
                       bool(body.stream_options and body.stream_options.include_usage), body.prompt)
    results = await run_in_threadpool(_results, handles)
    await run_in_threadpool(capture, request, target, body.prompt, results[0].text, results[0].request_id,
                            "completion")
    choices = []
    for i, result in enumerate(results):
        logprobs = await run_in_threadpool(_logprobs, request, target, ids, body, result, "completion")
        choices.append({"index": i, "text": result.text, "finish_reason": result.finish_reason, "logprobs": logprobs})
    return {"id": results[0].request_id, "object": "text_completion", "created": int(time.time()),
            "model": target.model, "choices": choices, "usage": _usage_all(results), "lorafleet": target.metadata()}


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
                bare = a.ref.startswith(f"{DEFAULT_PREFIX}/")  # loaded by a bare vLLM-style name
                data.append({"id": a.name if bare else a.ref, "object": "model", "created": int(a.created_at.timestamp()),
                             "owned_by": a.tenant})
        left -= len(items)
        if cursor is None:
            break
    return {"object": "list", "data": data}
