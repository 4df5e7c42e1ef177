"""The predecessors' routes, over the same queue (``LEGACY_ROUTES=0`` turns them off).

CPU service (Akash, port 8002): ``POST /separate-sync`` (JSON, data-URI audio, waits),
``POST /separate-async`` (form fields, webhook on completion); its ``GET /health`` and
``GET /`` are the app's. GPU template (Vast.ai, port 8185): ``POST /job``, ``GET /job/{id}``
(the progress.txt JSON), ``GET /jobs``, ``GET /status``; ``GET /result/{id}`` is in
routes_results.

Their ``model`` names the model when this server has it; otherwise the server's default model
runs (their ``mdx_q`` is rarely baked) and the answer says so in ``warnings``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from handler import config
from handler.adapters.http.store import COMPLETED, QUEUED, RUNNING
from handler.adapters.http.views import CPU_STATUS, GPU_STATE, cpu_result, gpu_progress
from handler.errors import WorkerError

router = APIRouter(tags=["predecessors' routes"])


def _service(request: Request) -> Any:
    return request.app.state.service


def _model(name: str | None) -> tuple[str | None, list[str]]:
    """(model to run, warnings): a name this server cannot load falls back to the default."""
    if not name:
        return None, []
    from handler.core.models import get_model

    try:
        get_model(name)
        return name, []
    except WorkerError as exc:
        return None, [f"model {name!r} is not available here ({exc.code}); ran "
                      f"{config.default_model()!r} instead"]


# --- the CPU service --------------------------------------------------------------------------


class SeparateSync(BaseModel):
    model_config = ConfigDict(extra="ignore")
    audio_base64: str
    model: str | None = None
    output_format: str = "mp3"


@router.post("/separate-sync")
async def separate_sync(request: Request, body: SeparateSync) -> JSONResponse:
    """Separate a data-URI clip and answer the result inline as data URIs, waiting up to
    ``SEPARATION_TIMEOUT``; a job still running then is answered 504 with its ``job_id``."""
    service = _service(request)
    model, warnings = await asyncio.to_thread(_model, body.model)
    job_input: dict[str, Any] = {"audio_base64": body.audio_base64,
                                 "output_format": body.output_format, "return_base64": True}
    if model:
        job_input["model"] = model
    job, _ = await asyncio.to_thread(service.submit, request, kind="cpu_sync",
                                     job_input=job_input)
    timeout = service.settings.execution_timeout_s + 5  # the predecessor waited this long
    job = await service.wait(job.id, timeout, cap=timeout)
    answer = cpu_result(service.store, job)
    if warnings:
        answer["warnings"] = warnings + answer.get("warnings", [])
    if not job.terminal:
        return JSONResponse(answer, 504)
    if job.status != COMPLETED:
        code = 400 if (job.error or "").startswith("INVALID_INPUT") else 500
        return JSONResponse(answer, code)
    return JSONResponse(answer)


@router.post("/separate-async")
def separate_async(request: Request, job_id: str | None = Form(None),
                   audio_url: str = Form(...), webhook_url: str | None = Form(None),
                   model: str | None = Form(None)) -> dict:
    """Queue a URL; the result is POSTed to ``webhook_url``. The caller's ``job_id`` is the
    job's id, so sending the same one twice returns the existing job."""
    service = _service(request)
    chosen, warnings = _model(model)
    job_input: dict[str, Any] = {"audio_url": audio_url}
    if chosen:
        job_input["model"] = chosen
    job, created = service.submit(request, kind="cpu_async", job_input=job_input,
                                  webhook=webhook_url or None, job_id=job_id or None)
    answer: dict[str, Any] = {"status": CPU_STATUS[job.status], "job_id": job.id, "id": job.id,
                              "created": created, "status_url": f"/status/{job.id}"}
    if warnings:
        answer["warnings"] = warnings
    return answer


# --- the GPU template --------------------------------------------------------------------------


class GpuJob(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input_url: str
    interval_cut: str | list[float] | None = None
    model: str | None = None


@router.post("/job")
def create_job(request: Request, body: GpuJob) -> dict:
    service = _service(request)
    job_input: dict[str, Any] = {"audio_url": body.input_url}
    if body.interval_cut:
        job_input["interval_cut"] = body.interval_cut
    chosen, warnings = _model(body.model)
    if chosen:
        job_input["model"] = chosen
    job, _ = service.submit(request, kind="gpu", job_input=job_input)
    answer: dict[str, Any] = {"job_id": job.id, "id": job.id, "status": job.status,
                              "state": GPU_STATE[job.status]}
    if warnings:
        answer["warnings"] = warnings
    return answer


@router.get("/job/{job_id}")
def job_progress(request: Request, job_id: str) -> dict:
    """The progress.txt JSON the GPU template wrote (and the CLI's ``--progress-file``)."""
    service = _service(request)
    return gpu_progress(service.store, service.get(job_id), service.model_ready)


@router.get("/jobs")
def list_jobs(request: Request, status: str | None = None, ids: str | None = None,
              limit: int = Query(100, ge=1, le=1000), cursor: int = Query(0, ge=0)) -> dict:
    """Jobs, oldest first: ``?status=COMPLETED``, ``?ids=a,b,c`` (batch status), paged with
    ``?cursor=`` (the ``next_cursor`` of the previous page)."""
    service = _service(request)
    id_list = [i for i in (ids or "").split(",") if i][:1000] or None
    rows = service.store.list(status=status, ids=id_list, limit=limit, after_seq=cursor)
    jobs = [{"job_id": job.id, "id": job.id, "status": job.status,
             "state": GPU_STATE[job.status], "kind": job.kind,
             "percent": (100.0 if job.status == COMPLETED
                         else round(100 * (job.progress or {}).get("progress", 0), 1)),
             "error": job.error, "created_at": job.created_at,
             "completed_at": job.completed_at} for _, job in rows]
    return {"jobs": jobs, "count": len(jobs),
            "next_cursor": rows[-1][0] if len(rows) == limit else None}


@router.get("/status")
def server_status(request: Request) -> dict:
    """The GPU template's server status: ``models_ready`` and the active jobs."""
    service = _service(request)
    counts = service.store.counts()
    running = [job.id for _, job in service.store.list(status=RUNNING, limit=100)]
    return {"status": service.health()["status"], "models_ready": service.model_ready,
            "active_jobs": running, "active": len(running),
            "queued_jobs": counts.get(QUEUED, 0), "max_concurrency":
            service.settings.max_concurrency}
