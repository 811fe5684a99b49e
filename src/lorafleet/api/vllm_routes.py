"""vLLM's dynamic LoRA routes, for drop-in migration: ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter`` (admin key; vLLM gates them behind ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``).

Loading imports the PEFT folder at ``lora_path`` (a path on the server, or an fsspec URL) exactly like
``lorafleet adapters import`` and points ``live`` at it; unloading removes ``live`` (audited; revisions stay).
A bare ``lora_name`` lives under ``local/lora/`` and is also what ``model`` may say in a completion request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from lorafleet.api.auth import admin_key
from lorafleet.api.keys import ApiKey

router = APIRouter(prefix="/v1", tags=["vllm"])
Admin = Annotated[ApiKey, Depends(admin_key)]


class LoadLora(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(..., min_length=1, max_length=191, description="a bare name, or tenant/user/adapter")
    lora_path: str = Field(..., min_length=1, max_length=4096, description="PEFT folder: a server path or URL")
    load_inplace: bool = Field(False, description="replace an adapter of that name that is already loaded")


class UnloadLora(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(..., min_length=1, max_length=191)
    lora_int_id: int | None = Field(None, description="accepted for vLLM compatibility; unused")


@router.post("/load_lora_adapter", summary="vLLM-style: import a PEFT folder and serve it as lora_name")
async def load_lora_adapter(body: LoadLora, request: Request, key: Admin) -> dict:
    svc = request.app.state.service
    res = await run_in_threadpool(svc.load_lora, body.lora_name, body.lora_path, creator=f"key:{key.id}",
                                  replace=body.load_inplace)
    return {"object": "lora_adapter", "lora_name": body.lora_name, "model": body.lora_name, **res.to_dict(),
            "message": f"Success: LoRA adapter '{body.lora_name}' added successfully."}


@router.post("/unload_lora_adapter", summary="vLLM-style: stop serving lora_name (its live alias is removed)")
async def unload_lora_adapter(body: UnloadLora, request: Request, key: Admin) -> dict:
    svc = request.app.state.service
    entry = await run_in_threadpool(svc.unload_lora, body.lora_name, actor=f"key:{key.id}")
    return {"object": "lora_adapter", "lora_name": body.lora_name, "ref": entry.ref,
            "unloaded_revision": entry.from_number,
            "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}
