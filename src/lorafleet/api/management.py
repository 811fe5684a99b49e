"""The management API (admin keys): adapters, revisions (upload/download), aliases, jobs, evaluation
results, residency."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, Field

from lorafleet.api.auth import admin_key
from lorafleet.api.errors import ApiError
from lorafleet.api.keys import ApiKey
from lorafleet.instant import InstantError, create_from_profile
from lorafleet.training.data import dataset_from_records

router = APIRouter(prefix="/v1", tags=["management"])
Admin = Annotated[ApiKey, Depends(admin_key)]
Name = Annotated[str, Path(min_length=1, max_length=63)]
AliasName = Annotated[str, Path(min_length=1, max_length=32)]
RevNo = Annotated[int, Path(ge=1, le=2**31 - 1)]
JobId = Annotated[int, Path(ge=1, le=2**53)]
MAX_INT = 2**31 - 1


class AdapterCreate(BaseModel):
    ref: str = Field(..., min_length=5, max_length=191, description="tenant/user/adapter")
    description: str = Field("", max_length=2000)
    parent: str | None = Field(None, min_length=5, max_length=191,
                               description="stack it on this adapter of the same tenant (tenant/user/adapter)")
    from_profile: str | None = Field(None, max_length=2000, description="generate revision #1 from this profile")
    examples: list[dict] | None = Field(None, max_length=64, description="with from_profile: example conversations "
                                        "({'messages': [...]}, at most 8)")
    generator: str | None = Field(None, min_length=5, max_length=200, description="with from_profile: the generator "
                                  "revision (default _instant/generators/<base>)")


class ParentSet(BaseModel):
    parent: str | None = Field(..., min_length=5, max_length=191, description="new parent; null detaches")
    reason: str = Field("", max_length=2000)


class AliasSet(BaseModel):
    number: int = Field(..., ge=1, le=MAX_INT, description="revision number the alias points at")
    reason: str = Field("", max_length=2000)


class RollbackRequest(BaseModel):
    to: int | None = Field(None, ge=1, le=MAX_INT, description="revision to roll back to (default: the previous live)")
    reason: str = Field("", max_length=2000)


class JobCreate(BaseModel):
    ref: str = Field(..., min_length=5, max_length=191)
    method: str = Field("sft", pattern="^(sft|dpo)$")
    records: list[dict] = Field(..., min_length=1, max_length=100_000, description="SFT examples or DPO pairs")
    rank: int = Field(8, ge=1, le=64)
    alpha: float | None = Field(None, gt=0)
    targets: str = Field("all", max_length=200)
    steps: int = Field(30, ge=1, le=100_000)
    lr: float = Field(1e-3, gt=0, le=1.0)
    batch_size: int = Field(4, ge=1, le=256)
    max_len: int = Field(256, ge=8, le=8192)
    seed: int = Field(0, ge=0, le=MAX_INT)
    warm_start: str = Field("live", pattern="^(live|none)$")


def _svc(request: Request):
    return request.app.state.service


def _ref(tenant: str, user: str, name: str) -> str:
    return f"{tenant}/{user}/{name}"


@router.post("/adapters", status_code=201, summary="Create an adapter identity")
def create_adapter(body: AdapterCreate, request: Request, key: Admin) -> dict:
    if body.from_profile is not None:  # a generated first revision (docs/instant.md)
        if body.parent is not None:
            raise InstantError("from_profile makes a new adapter's first revision: it takes no parent")
        svc = _svc(request)
        out = create_from_profile(svc.registry, svc.base, body.ref, body.from_profile, body.examples,
                                  generator=body.generator, creator=f"key:{key.id}")
        return {**svc.registry.get_adapter(body.ref).to_dict(), "revision": out.revision.to_dict(),
                "generation_seconds": out.seconds, "generator": out.generator}
    if body.examples is not None or body.generator is not None:
        raise InstantError("examples and generator go with from_profile")
    return _svc(request).registry.create_adapter(body.ref, creator=f"key:{key.id}", description=body.description,
                                                 parent=body.parent).to_dict()


@router.put("/adapters/{tenant}/{user}/{name}/parent", summary="Stack an adapter on a parent, or detach it (audited)")
def set_parent(tenant: Name, user: Name, name: Name, body: ParentSet, request: Request, key: Admin) -> dict:
    return _svc(request).registry.set_parent(_ref(tenant, user, name), body.parent, actor=f"key:{key.id}",
                                             reason=body.reason).to_dict()


@router.get("/adapters/{tenant}/{user}/{name}/stack", summary="The revisions a request applies, root first")
def show_stack(tenant: Name, user: Name, name: Name, request: Request, _: Admin,
               alias: str = Query("live", max_length=32)) -> dict:
    revs = _svc(request).registry.resolve_stack(f"{_ref(tenant, user, name)}@{alias}")
    return {"object": "list", "data": [r.to_dict() for r in revs]}


@router.get("/adapters", summary="List adapters (keyset pagination)")
def list_adapters(request: Request, _: Admin, tenant: str | None = Query(None, max_length=63),
                  user: str | None = Query(None, max_length=63), prefix: str | None = Query(None, max_length=191),
                  limit: int = Query(100, ge=1, le=1000), cursor: str | None = Query(None, max_length=512)) -> dict:
    items, next_cursor = _svc(request).registry.list_adapters(tenant=tenant, user=user, prefix=prefix, limit=limit,
                                                              cursor=cursor)
    return {"object": "list", "data": [a.to_dict() for a in items], "next_cursor": next_cursor}


@router.get("/adapters/{tenant}/{user}/{name}", summary="Show an adapter")
def show_adapter(tenant: Name, user: Name, name: Name, request: Request, _: Admin) -> dict:
    return _svc(request).registry.get_adapter(_ref(tenant, user, name)).to_dict()


@router.get("/adapters/{tenant}/{user}/{name}/revisions", summary="Revision history with provenance and metrics")
def history(tenant: Name, user: Name, name: Name, request: Request, _: Admin) -> dict:
    revs = _svc(request).registry.history(_ref(tenant, user, name))
    return {"object": "list", "data": [r.to_dict() for r in revs]}


@router.get("/adapters/{tenant}/{user}/{name}/revisions/{number}", summary="One revision, with its evaluation results")
def show_revision(tenant: Name, user: Name, name: Name, number: RevNo, request: Request,
                  _: Admin) -> dict:
    return _svc(request).registry.resolve(f"{_ref(tenant, user, name)}#{number}").to_dict()


@router.get("/adapters/{tenant}/{user}/{name}/audit", summary="Audit log (alias moves, with who and why)")
def audit(tenant: Name, user: Name, name: Name, request: Request, _: Admin,
          limit: int = Query(100, ge=1, le=10_000)) -> dict:
    return {"object": "list", "data": [e.to_dict() for e in _svc(request).registry.audit(_ref(tenant, user, name), limit)]}


@router.post("/adapters/{tenant}/{user}/{name}/revisions", status_code=201,
             summary="Upload a revision: multipart PEFT files, or a lorafleet/safetensors body")
async def upload_revision(tenant: Name, user: Name, name: Name, request: Request, response: Response, key: Admin,
                          alias: str = Query("candidate", max_length=32),
                          base_fingerprint: str | None = Query(None, max_length=128),
                          idempotency_key: str | None = Header(
                              None, description="retry-safe upload: the same key and content return the first "
                                                "attempt's revision (200); other content under it is refused (409)")
                          ) -> dict:
    svc = _svc(request)
    ref = _ref(tenant, user, name)
    if idempotency_key is not None and not (1 <= len(idempotency_key) <= 255 and idempotency_key.isascii()
                                            and idempotency_key.isprintable()):
        raise ApiError(400, "Idempotency-Key must be 1-255 printable ASCII characters", code="invalid_request",
                       param="Idempotency-Key")
    svc.registry.get_adapter(ref)  # 404 before reading a large body
    limit = svc.limits.max_upload_bytes
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        _check_declared(request, limit)
        form = await request.form(max_files=16, max_fields=4, max_part_size=limit)  # a save_pretrained folder + extras
        files = {f.filename or "": await f.read(limit + 1) for _, f in form.multi_items() if hasattr(f, "read")}
        adapter = svc.validate_peft_files(files, base_fingerprint)
    else:
        body = await _read_limited(request, limit)
        adapter = svc.validate_blob(body, base_fingerprint)
    info, replayed = svc.commit_uploaded(ref, adapter, creator=f"key:{key.id}", alias=alias,
                                         idempotency_key=idempotency_key)
    if replayed:
        response.status_code = 200
        response.headers["idempotent-replayed"] = "true"
    return {**info.to_dict(), "ignored_files": adapter.meta.get("ignored", [])}


def _check_declared(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload of {declared} bytes is over the limit of {limit} bytes", code="too_large")


async def _read_limited(request: Request, limit: int) -> bytes:
    _check_declared(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"upload is over the limit of {limit} bytes", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


@router.get("/adapters/{tenant}/{user}/{name}/revisions/{number}/download", summary="Download a revision",
            response_class=Response)
def download_revision(tenant: Name, user: Name, name: Name, number: RevNo, request: Request,
                      _: Admin, format: str = Query("safetensors", pattern="^(safetensors|peft)$")) -> Response:
    from lorafleet.adapters import from_bytes, peft_io  # noqa: PLC0415 - defers torch

    svc = _svc(request)
    info, data = svc.registry.load(f"{_ref(tenant, user, name)}#{number}", base_fingerprint=svc.base.fingerprint)
    if format == "safetensors":
        return Response(data, media_type="application/octet-stream",
                        headers={"content-disposition": f'attachment; filename="{name}-{number}.safetensors"',
                                 "x-lorafleet-digest": info.digest})
    adapter = from_bytes(data, svc.base)
    adapter.base_name = svc.base.name
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(peft_io.CONFIG_FILE, json.dumps(peft_io.peft_config(adapter), indent=2, sort_keys=True))
        zf.writestr(peft_io.WEIGHTS_FILE, peft_io.peft_weights_bytes(adapter))
    return Response(buf.getvalue(), media_type="application/zip",
                    headers={"content-disposition": f'attachment; filename="{name}-{number}.zip"'})


@router.put("/adapters/{tenant}/{user}/{name}/aliases/{alias}", summary="Point an alias at a revision (audited)")
def set_alias(tenant: Name, user: Name, name: Name, alias: AliasName, body: AliasSet,
              request: Request, key: Admin) -> dict:
    entry = _svc(request).registry.set_alias(_ref(tenant, user, name), alias, body.number, actor=f"key:{key.id}",
                                             reason=body.reason)
    return entry.to_dict()


@router.delete("/adapters/{tenant}/{user}/{name}/aliases/{alias}", summary="Remove an alias (audited)")
def delete_alias(tenant: Name, user: Name, name: Name, alias: AliasName, request: Request,
                 key: Admin, reason: str = Query("", max_length=2000)) -> dict:
    return _svc(request).registry.delete_alias(_ref(tenant, user, name), alias, actor=f"key:{key.id}",
                                               reason=reason).to_dict()


@router.post("/adapters/{tenant}/{user}/{name}/rollback", summary="Move live back (previous or a named revision)")
def rollback(tenant: Name, user: Name, name: Name, body: RollbackRequest, request: Request, key: Admin) -> dict:
    return _svc(request).registry.rollback(_ref(tenant, user, name), to=body.to, actor=f"key:{key.id}",
                                           reason=body.reason).to_dict()


@router.post("/jobs", status_code=201, summary="Submit a training job")
def submit_job(body: JobCreate, request: Request, key: Admin) -> dict:
    from lorafleet.adapters import LoraSpec  # noqa: PLC0415 - defers torch
    from lorafleet.training.trainer import TrainConfig  # noqa: PLC0415 - defers torch

    spec = LoraSpec(rank=body.rank, alpha=body.alpha or 2.0 * body.rank, target_modules=body.targets)
    config = TrainConfig(method=body.method, steps=body.steps, lr=body.lr, batch_size=body.batch_size,
                         max_len=body.max_len, seed=body.seed)
    dataset = dataset_from_records(body.records, body.method, source="request")
    job = _svc(request).jobs.submit(body.ref, dataset, spec, config, creator=f"key:{key.id}", warm_start=body.warm_start)
    return job.to_dict()


@router.get("/jobs", summary="List training jobs, newest first")
def list_jobs(request: Request, _: Admin, state: str | None = Query(None, max_length=16),
              ref: str | None = Query(None, max_length=191), limit: int = Query(50, ge=1, le=1000),
              before: int | None = Query(None, ge=1, le=2**53)) -> dict:
    jobs = _svc(request).jobs.list(state=state, ref=ref, limit=limit, before_id=before)
    return {"object": "list", "data": [j.to_dict() for j in jobs]}


@router.get("/jobs/{job_id}", summary="One training job: status, progress, loss curve")
def show_job(job_id: JobId, request: Request, _: Admin) -> dict:
    return _svc(request).jobs.get(job_id).to_dict()


@router.delete("/jobs/{job_id}", summary="Cancel a training job")
def cancel_job(job_id: JobId, request: Request, key: Admin) -> dict:
    return _svc(request).jobs.cancel(job_id, actor=f"key:{key.id}").to_dict()


@router.get("/fleet/residency", summary="Which adapters are in compute slots, in RAM, and the hit rates")
def residency(request: Request, _: Admin) -> dict:
    return _svc(request).residency()
