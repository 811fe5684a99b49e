"""Continual-learning routes: feedback on served answers, memory settings, and forgetting a user.

* ``POST /v1/feedback`` (any key; a tenant key reaches its tenant's responses only) — on a captured response id:
  ``rating`` (-1/0/1), a preferred ``rewrite`` (becomes an SFT example), or ``other_id`` + ``preferred``
  (a choice between two answers to the same prompt: a DPO pair).
* ``GET|PUT /v1/adapters/{tenant}/{user}/{name}/memory`` (admin) — capture opt-in and the update policy.
* ``GET /v1/users/{tenant}/{user}/memory`` (admin) — what is stored about a user; ``?export=true`` all of it.
* ``DELETE /v1/users/{tenant}/{user}`` (admin) — forget the user everywhere (see :mod:`lorafleet.api.forget`).

Capture itself happens in the OpenAI routes through :func:`capture`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from lorafleet.api.auth import admin_key, current_key
from lorafleet.api.forget import forget_user as forget
from lorafleet.api.keys import ApiKey
from lorafleet.continual.schedule import UpdatePolicy
from lorafleet.registry.memory import MemoryStore
from lorafleet.registry.names import parse_address

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["continual"])
Key = Annotated[ApiKey, Depends(current_key)]
Admin = Annotated[ApiKey, Depends(admin_key)]
Name = Annotated[str, Path(min_length=1, max_length=63)]


class FeedbackRequest(BaseModel):
    response_id: str = Field(..., min_length=1, max_length=64, description="the `id` of a served completion")
    rating: Literal[-1, 0, 1] | None = Field(None, description="thumbs down / neutral / up; up makes the answer an "
                                                               "SFT example")
    rewrite: str | None = Field(None, min_length=1, max_length=200_000, description="the answer the user wanted")
    other_id: str | None = Field(None, min_length=1, max_length=64,
                                 description="another served answer to the same prompt (a choice: DPO pair)")
    preferred: Literal["this", "other"] = Field("this", description="with other_id: which answer the user prefers")


class MemorySettingsRequest(BaseModel):
    capture: bool | None = Field(None, description="record this adapter's conversations (off by default)")
    enabled: bool | None = Field(None, description="scheduled updates on/off")
    policy: dict | None = Field(None, description="update policy (see docs/continual.md); omitted keys keep defaults")


def memory(request: Request) -> MemoryStore:
    return request.app.state.service.memory


def capture(request: Request, target, prompt, text: str, response_id: str, kind: str) -> None:
    """Record a served exchange when its adapter captures (the base is never captured). Never fails the request:
    a capture error is logged and the answer still goes out."""
    if target.revision is None:
        return
    try:
        addr = parse_address(target.revision)
        memory(request).record(addr.ref, response_id, prompt=prompt, response=text, revision=addr.number, kind=kind)
    except Exception as exc:  # noqa: BLE001 - capture is best effort by design (see docstring)
        log.warning("capture of %s for %s failed: %s", response_id, target.revision, exc)


@router.post("/feedback", status_code=201, summary="Feedback on a served answer: rating, rewrite, or a choice")
async def post_feedback(body: FeedbackRequest, request: Request, key: Key) -> dict:
    tenant = None if key.is_admin else key.tenant
    row = await run_in_threadpool(
        memory(request).add_feedback, body.response_id, rating=body.rating, rewrite=body.rewrite,
        other_id=body.other_id, preferred=body.preferred, tenant=tenant)
    return {"object": "feedback", **row}


@router.get("/adapters/{tenant}/{user}/{name}/memory", summary="An adapter's capture setting and update schedule")
def get_memory_settings(tenant: Name, user: Name, name: Name, request: Request, _: Admin) -> dict:
    ref = f"{tenant}/{user}/{name}"
    request.app.state.service.registry.get_adapter(ref)
    return memory(request).settings(ref).to_dict()


@router.put("/adapters/{tenant}/{user}/{name}/memory", summary="Set capture and the update schedule of an adapter")
def put_memory_settings(tenant: Name, user: Name, name: Name, body: MemorySettingsRequest, request: Request,
                        _: Admin) -> dict:

    policy = UpdatePolicy.from_dict(body.policy).to_dict() if body.policy is not None else None
    return memory(request).configure(f"{tenant}/{user}/{name}", capture=body.capture, enabled=body.enabled,
                                     policy=policy).to_dict()


@router.get("/users/{tenant}/{user}/memory", summary="What is stored about a user (export=true: all of it)")
def show_user_memory(tenant: Name, user: Name, request: Request, _: Admin,
                     export: bool = Query(False, description="return every interaction and feedback row")) -> dict:
    store = memory(request)
    return store.export(tenant, user) if export else store.show(tenant, user)


@router.delete("/users/{tenant}/{user}", summary="Forget a user: interactions, revisions, blobs, caches (audited)")
def forget_user(tenant: Name, user: Name, request: Request, key: Admin) -> dict:
    svc = request.app.state.service
    purge = svc.engine.purge if svc.engine is not None and hasattr(svc.engine, "purge") else None
    return forget(svc.registry, tenant, user, actor=f"key:{key.id}", memory=memory(request), purge=purge,
                  tinker=getattr(request.app.state, "tinker", None))
