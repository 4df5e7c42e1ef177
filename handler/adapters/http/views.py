"""What callers see of a job: RunPod's job object, and the predecessors' views of it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from handler.adapters.http.store import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    TIMED_OUT,
    Job,
    JobStore,
)


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z") if ts else None


def _ms(a: float | None, b: float | None) -> int:
    return int(round(1000 * (b - a))) if a and b else 0


def final_item(store: JobStore, job: Job) -> dict | None:
    """The job's result item (the last one it yielded), once COMPLETED."""
    if job.status != COMPLETED or not job.n_items:
        return None
    items = store.items(job.id, job.n_items - 1)
    return items[-1] if items else None


def job_object(store: JobStore, job: Job, *, with_output: bool = True) -> dict[str, Any]:
    """RunPod's job object (``/status``): ``output`` is the aggregate stream (every item the
    job yielded, the result last), as the deployed worker returns it; a failure is FAILED with
    ``error``. ``progress`` (the latest progress item) is this server's extension."""
    now = time.time()
    body: dict[str, Any] = {
        "id": job.id,
        "status": job.status,
        "delayTime": _ms(job.created_at, job.started_at or (None if job.terminal else now)),
        "executionTime": _ms(job.started_at, job.completed_at or now) if job.started_at else 0,
        "createdAt": _iso(job.created_at),
        "startedAt": _iso(job.started_at),
        "completedAt": _iso(job.completed_at),
        "attempts": job.attempts,
        "progress": job.progress,
    }
    if job.status == COMPLETED and with_output:
        body["output"] = store.items(job.id)
    if job.error:
        body["error"] = job.error
    return body


# --- the GPU predecessor (port 8185): progress.txt's JSON ------------------------------------

GPU_STATE = {QUEUED: "idle", RUNNING: "demucs", COMPLETED: "completed", FAILED: "error",
             CANCELLED: "error", TIMED_OUT: "error"}
_TASKS_BY_STAGE = {  # models, cutting, inference, conversion (as the CLI's progress file)
    "download": ("done", "running", "pending", "pending"),
    "decode": ("done", "running", "pending", "pending"),
    "separate": ("done", "done", "running", "running"),
    "encode": ("done", "done", "done", "running"),
    "upload": ("done", "done", "done", "running"),
}
_TASK_NAMES = ("models", "cutting", "inference", "conversion")


def gpu_progress(store: JobStore, job: Job, models_ready: bool) -> dict[str, Any]:
    progress = job.progress or {}
    if job.status == COMPLETED:
        tasks = dict.fromkeys(_TASK_NAMES, "done")
    elif job.status == QUEUED:
        tasks = dict(zip(_TASK_NAMES, ("done" if models_ready else "pending",) + ("pending",) * 3,
                         strict=True))
    else:
        states = _TASKS_BY_STAGE.get(progress.get("stage", ""), ("done",) + ("pending",) * 3)
        if job.status != RUNNING:  # failed: what was running is in error
            states = tuple("error" if s == "running" else s for s in states)
        tasks = dict(zip(_TASK_NAMES, states, strict=True))
    done, total = progress.get("completed_segments", 0), progress.get("total_segments", 0)
    percent = 100.0 if job.status == COMPLETED else round(100.0 * progress.get("progress", 0), 1)
    end = job.completed_at or time.time()
    body: dict[str, Any] = {
        "state": GPU_STATE[job.status],
        "tasks": tasks,
        "timestamp": time.time(),
        "elapsed_seconds": round(end - job.started_at, 3) if job.started_at else 0.0,
        "details": {"models_ready": models_ready, "completed_segments": done,
                    "total_segments": total, "percent": percent},
        "job_id": job.id,
        "status": job.status,
    }
    final = final_item(store, job)
    if final is not None:
        body["details"]["outputs"] = [o.get("url") for o in final.get("outputs", [])]
    if job.error:
        body["error"] = job.error
    return body


# --- the CPU predecessor (port 8002) ---------------------------------------------------------

CPU_STATUS = {QUEUED: "queued", RUNNING: "processing", COMPLETED: "completed",
              FAILED: "failed", CANCELLED: "cancelled", TIMED_OUT: "failed"}


def cpu_result(store: JobStore, job: Job) -> dict[str, Any]:
    """``{status, job_id, model, output_format, outputs: {stem: URL or data URI}}``."""
    body: dict[str, Any] = {"status": CPU_STATUS[job.status], "job_id": job.id}
    final = final_item(store, job)
    if final is not None:
        body["model"] = final.get("model")
        outputs = final.get("outputs", [])
        body["output_format"] = outputs[0].get("format") if outputs else None
        body["outputs"] = {_output_name(o): o.get("url") for o in outputs}
        if final.get("warnings"):
            body["warnings"] = final["warnings"]
    if job.error:
        body["error"] = job.error
    return body


def _output_name(output: dict) -> str:
    if output.get("interval") is not None:
        return f"{output.get('stem')}_{output['interval']:03d}"
    return str(output.get("stem"))


def webhook_body(store: JobStore, job: Job) -> dict[str, Any]:
    """The job object, as ``/status`` returns it; the CPU predecessor's async jobs also get its
    ``job_id``, lowercase ``status`` and ``outputs`` (the RunPod state stays in ``state``)."""
    body = job_object(store, job)
    if job.kind == "cpu_async":
        body = {**body, **cpu_result(store, job), "state": job.status}
    return body
