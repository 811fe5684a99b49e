"""Typed shapes of every JSON request of the Tinker routes (the SDK 0.38.0 request types, the fields we use).

Every body is validated here before the service sees it: a wrong shape (a string for a number, a list for an
object, a number out of the 64-bit range, a body nested deeper than JSON parsing allows) is a 400 naming the
field, never a 5xx or 409/429, which the SDK would retry. Strict types: ``"5"`` is not an integer and ``1`` is
not a boolean. Fields the SDK sends that lorafleet does not use (``type``, ``ttl_seconds``, …) are ignored.
Ranges that depend on the server (rank, num_samples, max_tokens) are checked by the service, which names them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from lorafleet.api.errors import ApiError

I64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**63 - 1)]
Id = Annotated[str, Field(max_length=1024)]
Number = Annotated[float, Field(allow_inf_nan=False)]


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", protected_namespaces=())


class SessionRef(Body):
    session_id: Id


MetaKey = Annotated[str, Field(min_length=1, max_length=256)]
MetaValue = Annotated[str, Field(max_length=4096)]
Metadata = Annotated[dict[MetaKey, MetaValue], Field(max_length=64)]


class CreateSession(Body):
    tags: list[Annotated[str, Field(max_length=256)]] = []
    user_metadata: Annotated[dict[MetaKey, Any], Field(max_length=64)] | None = None  # values kept as strings
    sdk_version: Id | None = None
    project_id: Id | None = None
    display_name: Annotated[str, Field(max_length=1024)] | None = None


class FinishReason(Body):
    type: Literal["success", "errored", "interrupted"] = "success"


class FinishSession(Body):
    reason: FinishReason | None = None
    detail: Annotated[str, Field(max_length=4096)] | None = None


class SearchOwner(Body):
    type: Literal["own", "accessible", "user"] = "own"
    owner_urns: list[Id] | None = None


class StatusQuery(Body):
    type: Literal["active", "cancelled", "failed", "client_finished"]
    reasons: list[Literal["success", "errored", "interrupted"]] | None = None


class SearchCursor(Body):
    last_created_at: Annotated[str, Field(max_length=64)]
    last_session_id: Id


class SessionSearch(Body):
    session_id: Id | None = None
    project_ids: list[Id] | None = None
    user_metadata: Metadata = {}
    display_name: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    owner: SearchOwner | None = None
    statuses: Annotated[list[StatusQuery], Field(min_length=1)] | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50
    cursor: SearchCursor | None = None


class WeightsInfo(Body):
    tinker_path: Id


class ModelRef(Body):
    model_id: Id


class FutureRef(Body):
    request_id: Id
    allow_metadata_only: bool = False


class LoraConfig(Body):
    rank: I64
    seed: U64 | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfig(Body):
    type: Id = "adamw"


class CreateModel(Body):
    session_id: Id
    model_seq_id: I64
    base_model: Id | None = None
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig | None = None


class AdamParams(Body):
    type: Id | None = None
    learning_rate: Number = 1e-4
    beta1: Number = 0.9
    beta2: Number = 0.95
    eps: Number = 1e-12
    weight_decay: Number = 0.0
    grad_clip_norm: Number = 0.0


class OptimStep(Body):
    model_id: Id
    seq_id: I64 | None = None
    adam_params: AdamParams | None = Field(None, validation_alias=AliasChoices("adam_params", "optim_params",
                                                                                 "optimizer_params"))


class SaveWeights(Body):
    model_id: Id
    path: Id | None = None
    seq_id: I64 | None = None
    sampling_session_seq_id: I64 | None = None
    user_metadata: Metadata | None = None  # stored with the checkpoint (sidecar / revision provenance)


class SaveWeightsExternal(Body):
    model_id: Id
    path: Id
    seq_id: I64 | None = None
    ttl_seconds: I64 | None = None  # accepted, not applied (files live until the user is forgotten)
    age_encryption_recipients: list[Annotated[str, Field(max_length=4096)]] | None = None  # refused by the service


class LoadWeights(Body):
    model_id: Id | None = None
    seq_id: I64 | None = None
    session_id: Id | None = None
    model_seq_id: I64 | None = None
    base_model: Id | None = None
    user_metadata: dict[str, Any] | None = None
    path: Id
    optimizer: bool = False
    optimizer_config: OptimizerConfig | None = None


class CreateSamplingSession(Body):
    session_id: Id
    sampling_session_seq_id: I64 | None = None
    base_model: Id | None = None
    model_path: Id | None = None


class Chunk(Body):
    type: Id = "encoded_text"
    tokens: list[I64] | None = None  # encoded_text; other chunk types are refused by name


class ModelInput(Body):
    chunks: list[Chunk]


class SamplingParams(Body):
    max_tokens: I64 | None = None
    seed: U64 | None = None
    stop: Annotated[str, Field(max_length=1024)] | list[Annotated[str, Field(max_length=1024)]] | list[I64] | None = None
    temperature: Number = 1.0
    top_k: I64 = -1
    top_p: Number = 1.0


class Sample(Body):
    num_samples: I64 = 1
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: Id | None = None
    model_path: Id | None = None
    sampling_session_id: Id | None = None
    seq_id: I64 | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: I64 = 0
    topk_sample_logprobs: I64 = 0
    target_prompt_logprobs: Any = None
    prompt_alt_tokens_k: I64 = 0


# ---------------------------------------------------------------------------------------------- responses
# What the JSON routes answer, documented in OpenAPI (``responses={200: ...}``) and checked by schemathesis's
# response-schema conformance (tests/api/test_schemathesis.py); the routes build the dicts themselves.


class Future(BaseModel):
    request_id: str
    model_id: str | None = None


class CreateModelOut(BaseModel):
    request_id: str
    model_id: str


class SessionOut(BaseModel):
    type: Literal["create_session"]
    session_id: str
    info_message: str


class SessionSummaryOut(BaseModel):
    session_id: str
    created_at: str
    owner: str
    project_id: str
    status: dict[str, Any] | None = None
    checkpoints_count: int
    display_name: str | None = None
    user_metadata: dict[str, str] | None = None


class SessionSearchOut(BaseModel):
    sessions: list[SessionSummaryOut]
    next_cursor: dict[str, str] | None = None


class SessionInfoOut(BaseModel):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None


class SessionsOut(BaseModel):
    sessions: list[str]


class WeightsInfoOut(BaseModel):
    base_model: str
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class ExternalUrlsOut(BaseModel):
    urls: dict[str, str]
    expires: str


class HeartbeatOut(BaseModel):
    type: Literal["session_heartbeat"]


class InfoOut(BaseModel):
    type: Literal["get_info"]
    model_id: str
    is_lora: bool
    lora_rank: int
    model_name: str
    model_data: dict[str, Any]


class SamplingSessionOut(BaseModel):
    type: Literal["create_sampling_session"]
    sampling_session_id: str


class SampleOut(BaseModel):
    request_id: str
    sample_sequence_ids: list[str]


def documented(model: type[BaseModel]) -> dict:
    """``responses=`` of a route whose 200 answer has ``model``'s shape."""
    return {200: {"model": model, "description": "OK"}}


def openapi_body(model: type[Body]) -> dict:
    """``openapi_extra`` documenting ``model`` as the route's JSON body (the routes parse it themselves)."""
    schema = model.model_json_schema(mode="validation")
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def parse_json(body: bytes, route: str) -> dict:
    """A JSON object body, or a 400 (not JSON, not an object, or nested deeper than the parser recurses)."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise ApiError(400, f"{route}: the JSON body is nested too deeply", code="invalid_request") from None
    except ValueError:
        raise ApiError(400, f"{route}: the body must be a JSON object", code="invalid_request") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"{route}: the body must be a JSON object", code="invalid_request")
    return value


def _field(loc: tuple) -> str:
    """``sampling_params.stop`` from a pydantic location, without the union members' tags (``list[int]``)."""
    parts = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or "-" in part or part in ("int", "str", "float", "bool")):
            break
        parts.append(str(part))
    return ".".join(parts) or "body"


def validate(model: type[Body], body: dict, route: str) -> dict:
    """``body`` checked against ``model``; the plain dict the service takes (unset optional fields left out)."""
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        where = _field(errors[0]["loc"])
        # A union (``stop``: a string, strings or token ids) fails once per member: name the field once.
        msgs = list(dict.fromkeys(e["msg"] for e in errors if _field(e["loc"]) == where))
        got = errors[0].get("input")
        shown = json.dumps(got)[:80] if isinstance(got, str | int | float | bool | type(None)) else type(got).__name__
        raise ApiError(400, f"{route}: {where}: {' or '.join(msgs)} (got {shown})", code="invalid_request",
                       param=where) from None
    except RecursionError:
        raise ApiError(400, f"{route}: the JSON body is nested too deeply", code="invalid_request") from None
    return parsed.model_dump(exclude_none=True)
