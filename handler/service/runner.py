"""The job as a stream: progress items, then exactly one final item (the result, or
``{"error": "CODE: message"}``). Shared by the RunPod handler and the HTTP service.

The job is checked at the door (``flow.open_job``), then its work runs in a thread while this
generator relays throttled progress. Progress items never carry an ``error`` key (RunPod fails
a job on the first item that does). Closing the generator, or setting ``cancel``, stops the work
within one chunk.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler import config
from handler.core.progress import Throttle
from handler.errors import Cancelled, InternalError, WorkerError, as_worker_error
from handler.service.flow import JobPlan, open_job

log = logging.getLogger(__name__)

# Overall progress: each stage's share of the bar.
STAGE_SPAN = {
    "download": (0.0, 0.08), "decode": (0.08, 0.1), "separate": (0.1, 0.93),
    "encode": (0.93, 0.95), "upload": (0.95, 1.0),
}
MAX_PROGRESS_EVENTS = 300
# A download with no Content-Length has no fraction: its share of the bar fills as
# done / (done + this), half at 4 MiB, and the item says how many bytes arrived.
UNKNOWN_SIZE_HALF_BYTES = 4 << 20


@dataclass
class _Event:
    stage: str
    done: int
    total: int


def safe_id(job_id: str) -> str:
    """The job id as one safe key segment and folder name.

    A retried job (same id) gets the same folder; distinct ids never share one: an id that
    had to be changed (other characters, too long, "." or "..") gets a hash of the original.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", job_id)
    if safe != job_id or len(safe) > 128 or set(safe) <= {"."}:
        digest = hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        safe = f"{safe[:100]}-{digest}"
    return safe


def remove_work_dirs(job_id: str) -> int:
    """Delete the work folders a dead process left for this job id (``job-<safe id>-`` and
    mkdtemp's 8 characters: another id that merely starts the same never matches)."""
    name = re.compile(rf"job-{re.escape(safe_id(job_id))}-[a-z0-9_]{{8}}")
    removed = 0
    try:
        entries = list(Path(config.work_dir()).iterdir())
    except OSError:
        return 0
    for entry in entries:
        if name.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def run_job(job: dict, cancel: threading.Event | None = None) -> Iterator[dict]:
    """Progress items, then one final item; never raises."""
    job_id = safe_id(str(job.get("id") or uuid.uuid4().hex))
    cancel = cancel or threading.Event()
    try:
        plan = open_job(job, job_id)
    except BaseException as exc:  # noqa: BLE001 - reported as a typed error
        yield {"error": str(_report_failure(exc, job_id))}
        return
    if not isinstance(plan, JobPlan):  # nothing to do
        yield plan
        return
    try:
        work = Path(tempfile.mkdtemp(prefix=f"job-{job_id}-", dir=config.work_dir()))
    except Exception as exc:  # noqa: BLE001 - still exactly one final item, never a raise
        log.error("job %s: cannot create its work directory", job_id, exc_info=True)
        yield {"error": str(InternalError(
            f"the worker's WORK_DIR is not usable ({type(exc).__name__})"))}
        return
    events: queue.Queue[_Event | tuple[str, Any]] = queue.Queue()

    def report(stage: str, done: int, total: int) -> None:
        if cancel.is_set():
            raise Cancelled("the job was cancelled")
        events.put(_Event(stage, done, total))

    def target() -> None:
        try:
            events.put(("result", plan.execute(work, report, cancel.is_set)))
        except BaseException as exc:  # noqa: BLE001 - reported as a typed error
            events.put(("error", _report_failure(exc, job_id)))

    thread = threading.Thread(target=target, name=f"job-{job_id}", daemon=True)
    thread.start()
    try:
        yield from _relay(events)
    finally:
        cancel.set()  # a closed generator (cancel, timeout) stops the pipeline
        thread.join(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def _report_failure(exc: BaseException, job_id: str) -> WorkerError:
    if not isinstance(exc, WorkerError):
        log.error("job %s failed unexpectedly", job_id, exc_info=True)
    return as_worker_error(exc)


def _relay(events: queue.Queue) -> Iterator[dict]:
    """Throttled progress from the work thread: at most ~1 item a second, sparser on long
    jobs, always one at a stage change, and a hard cap in all; then the final item."""
    started = time.monotonic()
    base = config.env_float("PROGRESS_INTERVAL_S", 1.0)
    throttle = Throttle(base)
    emitted = 0
    last_stage = None
    pending: _Event | None = None
    segments = (0, 0)
    while True:
        try:
            item = events.get(timeout=0.25)
        except queue.Empty:
            item = None
        if isinstance(item, tuple):
            kind, value = item
            yield value if kind == "result" else {"error": str(value)}
            return
        if item is not None:
            pending = item
            if item.stage == "separate":
                segments = (item.done, item.total)
        if pending is None or emitted >= MAX_PROGRESS_EVENTS:
            continue
        elapsed = time.monotonic() - started
        throttle.interval = max(base, elapsed / 50)
        if throttle.ready(force=pending.stage != last_stage):
            yield _progress_item(pending, elapsed, segments)
            emitted += 1
            last_stage = pending.stage
            pending = None


def _progress_item(ev: _Event, elapsed: float, segments: tuple[int, int]) -> dict:
    lo, hi = STAGE_SPAN.get(ev.stage, (0.0, 1.0))
    if ev.total:
        frac = min(1.0, ev.done / ev.total)
    elif ev.stage == "download":
        frac = ev.done / (ev.done + UNKNOWN_SIZE_HALF_BYTES)
    else:
        frac = 0.0
    overall = lo + (hi - lo) * frac
    eta = elapsed * (1 - overall) / overall if overall > 0.15 else None
    item: dict[str, Any] = {
        "status": "progress",
        "stage": ev.stage,
        "progress": round(overall, 4),
        "elapsed_s": round(elapsed, 2),
        "eta_s": round(eta, 1) if eta is not None else None,
    }
    item["completed_segments"], item["total_segments"] = segments
    if ev.stage == "download":
        item["downloaded_bytes"], item["total_bytes"] = ev.done, ev.total or None
    return item
