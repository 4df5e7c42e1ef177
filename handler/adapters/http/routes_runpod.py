"""RunPod's serverless job API (queue endpoints), self-hosted: mounted at ``/`` and at
``/v2/{endpoint_id}/`` (the id is ignored), so the unmodified runpod SDK works with
``runpod.endpoint_url_base = "http://HOST:PORT/v2"``."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from handler.adapters.http.store import COMPLETED, FAILED, QUEUED, RUNNING, TIMED_OUT
from handler.adapters.http.views import job_object

router = APIRouter(tags=["RunPod job API"])

_PREFER_WAIT = re.compile(r"\bwait(?:=(\d+(?:\.\d+)?))?", re.I)
RUNSYNC_DEFAULT_MS = 90_000  # RunPod's
PREFER_DEFAULT_S = 60.0  # Replicate's


class Policy(BaseModel):
    model_config = ConfigDict(extra="ignore")
    executionTimeout: float | None = None  # ms
    ttl: float | None = None  # ms


class RunRequest(BaseModel):
    """RunPod's request body; ``id`` (a client-chosen job id, idempotent) is an extension."""

    model_config = ConfigDict(extra="ignore")
    input: dict[str, Any]
    webhook: str | None = None
    policy: Policy | None = None
    s3Config: dict[str, Any] | None = None
    id: str | None = None


def _service(request: Request) -> Any:
    return request.app.state.service


def _submit(request: Request, body: RunRequest, idempotency_key: str | None) -> Any:
    job, _ = _service(request).submit(
        request, kind="runpod", job_input=body.input, s3_config=body.s3Config,
        webhook=body.webhook, policy=body.policy.model_dump() if body.policy else None,
        job_id=body.id or idempotency_key)
    return job


def _answer(request: Request, job: Any, *, full: bool) -> JSONResponse:
    service = _service(request)
    body = job_object(service.store, job) if full else {"id": job.id, "status": job.status}
    headers = {} if job.terminal else {"Location": f"/status/{job.id}"}
    return JSONResponse(body, headers=headers)


@router.post("/run")
async def run(request: Request, body: RunRequest,
              prefer: str | None = Header(None),
              idempotency_key: str | None = Header(None)) -> JSONResponse:
    """Queue a job: ``{id, status}``. With ``Prefer: wait[=N]`` wait up to N s (capped by
    ``SYNC_MAX_WAIT_S``) and answer the job object, finished or not."""
    job = await asyncio.to_thread(_submit, request, body, idempotency_key)
    match = _PREFER_WAIT.search(prefer or "")
    if match is None:
        return _answer(request, job, full=False)
    seconds = float(match.group(1)) if match.group(1) else PREFER_DEFAULT_S
    job = await _service(request).wait(job.id, seconds)
    return _answer(request, job, full=True)


@router.post("/runsync")
async def runsync(request: Request, body: RunRequest,
                  wait: int = Query(RUNSYNC_DEFAULT_MS, ge=1000, le=300_000),
                  idempotency_key: str | None = Header(None)) -> JSONResponse:
    """Queue a job and wait (``?wait=ms``, RunPod's 90 s by default) for it to finish."""
    job = await asyncio.to_thread(_submit, request, body, idempotency_key)
    job = await _service(request).wait(job.id, wait / 1000)
    return _answer(request, job, full=True)


@router.get("/status/{job_id}")
@router.post("/status/{job_id}", include_in_schema=False)
def status(request: Request, job_id: str) -> JSONResponse:
    """The job object (GET, as the SDK polls; POST too, as RunPod accepts)."""
    return _answer(request, _service(request).get(job_id), full=True)


@router.get("/stream/{job_id}", response_model=None)
@router.post("/stream/{job_id}", response_model=None, include_in_schema=False)
def stream(request: Request, job_id: str,
           accept: str | None = Header(None)) -> JSONResponse | StreamingResponse:
    """RunPod's ``{status, stream: [{output: item}]}`` with the items not read yet; with
    ``Accept: text/event-stream``, server-sent events until the job ends."""
    service = _service(request)
    if "text/event-stream" in (accept or ""):
        service.get(job_id)  # 404 before the stream starts
        start = int(request.headers.get("last-event-id", -1)) + 1
        return StreamingResponse(_events(request, job_id, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    got = service.store.read_stream(job_id)
    if got is None:
        service.get(job_id)  # raises 404
    job, items = got
    body: dict[str, Any] = {"id": job.id, "status": job.status,
                            "stream": [{"output": item} for item in items]}
    if job.error:
        body["error"] = job.error
    return JSONResponse(body)


async def _events(request: Request, job_id: str, start: int) -> AsyncIterator[str]:
    """``progress`` events, the result as ``output``, then ``completed`` with the job object
    (for every end state). Each event's id is the item number, for ``Last-Event-ID``."""
    service = _service(request)
    n = start
    idle = 0.0
    while True:
        job = service.store.get(job_id)
        if job is None:
            return
        for item in service.store.items(job_id, n):
            kind = "progress" if item.get("status") == "progress" else "output"
            yield f"id: {n}\nevent: {kind}\ndata: {json.dumps(item)}\n\n"
            n += 1
        if job.terminal and n >= job.n_items:
            body = job_object(service.store, job, with_output=False)
            yield f"event: completed\ndata: {json.dumps(body)}\n\n"
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.25)
        idle += 0.25
        if idle >= 15:  # a comment line keeps proxies from closing a quiet stream
            idle = 0.0
            yield ": keep-alive\n\n"


@router.post("/cancel/{job_id}")
def cancel(request: Request, job_id: str, _body: Any = Body(None)) -> dict:
    """A queued job is CANCELLED at once; a running one stops within one chunk."""
    service = _service(request)
    job = service.get(job_id)
    if job.status == QUEUED:
        service.store.finish(job_id, "CANCELLED", only_from=(QUEUED,))
    elif job.status == RUNNING:
        service.runner.cancel(job_id)
        service.store.finish(job_id, "CANCELLED", only_from=(RUNNING,))
    return {"id": job_id, "status": service.get(job_id).status}


@router.post("/retry/{job_id}")
def retry(request: Request, job_id: str, _body: Any = Body(None)) -> dict:
    """Re-queue a FAILED or TIMED_OUT job under the same id (RunPod's rule)."""
    service = _service(request)
    service.get(job_id)
    if not service.store.requeue(job_id, from_status=(FAILED, TIMED_OUT),
                                 reset_ttl_s=service.settings.job_ttl_s):
        raise HTTPException(400, "only FAILED or TIMED_OUT jobs can be retried")
    service.runner.wake()
    return {"id": job_id, "status": QUEUED}


@router.post("/purge-queue")
def purge_queue(request: Request, _body: Any = Body(None)) -> dict:
    """Cancel every queued job (running ones continue), as RunPod does."""
    removed = _service(request).store.purge_queue()
    return {"removed": removed, "status": COMPLETED}


@router.get("/health")
def health(request: Request) -> dict:
    """RunPod's ``{jobs, workers}`` and the predecessors' ``{status: "healthy", model,
    hardware, torch_version, cuda_available, device}`` in one superset."""
    return _service(request).health()
