"""One worker job: validate → fetch → separate (decode/encode inside) → store, as a generator.

The pipeline runs in a thread; the generator relays its throttled progress and then yields
exactly one final item: the result, or ``{"error": "CODE: message"}``. Progress items never
carry an ``error`` key (RunPod fails a job on the first item that does).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler import config
from handler.core.models import get_model
from handler.core.pipeline import (
    SeparationResult,
    StemOutput,
    resolve_stems,
    separate_file,
    validate,
)
from handler.errors import (
    Cancelled,
    InternalError,
    InvalidInput,
    UploadFailed,
    WorkerError,
    as_worker_error,
)
from handler.redact import redact_url
from handler.service.schema import JobInput, decode_base64_audio, parse_job_input, parse_s3_config
from handler.transfer import netguard, s3
from handler.transfer.http import download

log = logging.getLogger(__name__)

# Overall progress: each stage's share of the bar.
STAGE_SPAN = {
    "download": (0.0, 0.08), "decode": (0.08, 0.1), "separate": (0.1, 0.93),
    "encode": (0.93, 0.95), "upload": (0.95, 1.0),
}
MAX_PROGRESS_EVENTS = 300


@dataclass
class _Event:
    stage: str
    done: int
    total: int


class _Context:
    def __init__(self, job: dict, cancel: threading.Event | None = None):
        self.job = job
        self.job_id = _safe_id(str(job.get("id") or uuid.uuid4().hex))
        self.events: queue.Queue[_Event | tuple[str, Any]] = queue.Queue()
        self.cancel = cancel if cancel is not None else threading.Event()

    def report(self, stage: str, done: int, total: int) -> None:
        if self.cancel.is_set():
            raise Cancelled("the job was cancelled")
        self.events.put(_Event(stage, done, total))


def _safe_id(job_id: str) -> str:
    """The job id as one safe key segment and folder name.

    A retried job (same id) gets the same folder; distinct ids never share one: an id that
    had to be changed (other characters, too long, "." or "..") gets a hash of the original.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", job_id)
    if safe != job_id or len(safe) > 128 or set(safe) <= {"."}:
        digest = hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        safe = f"{safe[:100]}-{digest}"
    return safe


# --- destinations ---------------------------------------------------------------------------


class _Destination:
    """Where outputs go. ``check`` runs before any work so a misconfiguration costs nothing."""

    def check(self, n_outputs: int | None, names: list[str] | None = None) -> None:  # noqa: B027
        pass

    def store(self, output: StemOutput, name: str) -> dict:
        raise NotImplementedError


class _Bucket(_Destination):
    def __init__(self, settings: s3.S3Settings, key_for: Callable[[str, str], str]):
        self.settings = settings
        self.key_for = key_for  # (file name without extension, extension) -> key
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            self._client = s3.make_client(self.settings)
        return self._client

    def store(self, output: StemOutput, name: str) -> dict:
        key = self.key_for(name, output.file.format)
        assert self.settings.bucket is not None
        s3.upload_file(self.client(), output.file.path, self.settings.bucket, key,
                            output.file.content_type)
        url = s3.presign_get(self.client(), self.settings.bucket, key,
                                  self.settings.presign_expiry_s)
        return {"url": url, "key": key, "bucket": self.settings.bucket}


class _PresignedPut(_Destination):
    def __init__(self, urls: dict[str, str] | list[str]):
        self.urls = urls
        self._next = 0
        # Refuse a URL that could never be PUT to (scheme, metadata host, blocked IP literal)
        # before any work; put_presigned checks again, with DNS, when it connects.
        for url in urls.values() if isinstance(urls, dict) else urls:
            try:
                netguard.check_url(url, allow_private=config.allow_private_urls(),
                                   resolve_host=False)
            except InvalidInput as e:
                raise InvalidInput(f"output_urls: {e.message}") from None

    def check(self, n_outputs: int | None, names: list[str] | None = None) -> None:
        if isinstance(self.urls, list) and n_outputs is not None and len(self.urls) < n_outputs:
            raise InvalidInput(
                f"output_urls has {len(self.urls)} URL(s) for {n_outputs} output file(s)"
            )
        missing = [n for n in names or [] if isinstance(self.urls, dict) and n not in self.urls]
        if missing:
            raise InvalidInput(f"output_urls has no URL for output {', '.join(missing)}")

    def store(self, output: StemOutput, name: str) -> dict:
        if isinstance(self.urls, dict):
            # A stem's URL serves only an uncut output: interval files each need their own
            # (one shared URL would leave just the last interval).
            url = self.urls.get(name)
            if url is None and output.interval is None:
                url = self.urls.get(output.stem)
            if url is None:
                raise InvalidInput(f"output_urls has no URL for output {name!r}")
        else:
            url = self.urls[self._next]
            self._next += 1
        s3.put_presigned(url, output.file.path, output.file.content_type)
        return {"url": redact_url(url), "key": None}


class _Base64(_Destination):
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0

    def store(self, output: StemOutput, name: str) -> dict:
        self.used += output.file.bytes
        if self.used > self.max_bytes:
            raise InvalidInput(
                f"the result is larger than the {self.max_bytes // 1024 // 1024} MB limit of "
                "return_base64; use output_urls or the worker's bucket"
            )
        data = base64.b64encode(output.file.path.read_bytes()).decode()
        return {"url": f"data:{output.file.content_type};base64,{data}", "key": None}


@dataclass(frozen=True)
class LocalResults:
    """Keep outputs in ``dir`` (the HTTP server's DATA_DIR), served at ``url_prefix/<name>``.

    Set as ``job["local_results"]`` by the HTTP server only: a JSON job (RunPod's) can never
    carry this type, so a caller cannot point the worker at its disk.
    """

    dir: Path
    url_prefix: str
    url_suffix: str = ""  # e.g. the server's "?sig=..." download signature


class _LocalDir(_Destination):
    def __init__(self, where: LocalResults):
        self.where = where

    def store(self, output: StemOutput, name: str) -> dict:
        self.where.dir.mkdir(parents=True, exist_ok=True)
        dest = self.where.dir / f"{name}.{output.file.format}"
        shutil.move(output.file.path, dest)  # a rerun of the same job id overwrites
        url = f"{self.where.url_prefix}/{name}{self.where.url_suffix}"
        return {"url": url, "key": None}


def _destination(inp: JobInput, s3_config: Any, ctx: _Context,
                 event: tuple[str, str] | None) -> _Destination:
    if inp.return_base64:
        return _Base64(config.env_int("MAX_BASE64_OUTPUT_MB", 15) * 1024 * 1024)
    if inp.output_urls is not None:
        return _PresignedPut(inp.output_urls)
    if s3_config is not None:
        settings = s3.S3Settings.from_s3_config(s3_config.model_dump())
    else:
        settings = s3.S3Settings.from_env()
    if event is not None:
        bucket, input_key = event
        settings = dataclasses.replace(settings, bucket=bucket)
        return _Bucket(settings, lambda name, ext: s3.event_output_key(input_key, name, ext))
    local = ctx.job.get("local_results")
    if not settings.configured and s3_config is None and isinstance(local, LocalResults):
        return _LocalDir(local)
    if not settings.configured:
        raise UploadFailed(
            "no output destination: the worker has no bucket configured (BUCKET_NAME / "
            "BUCKET_ENDPOINT_URL) and the job gave neither output_urls, s3Config nor "
            "return_base64"
        )
    return _Bucket(settings, lambda name, ext: s3.output_key(
        settings.prefix, ctx.job_id, name, ext))


# --- the job --------------------------------------------------------------------------------


def _execute(ctx: _Context, work: Path) -> dict:
    started = time.perf_counter()
    inp = parse_job_input(ctx.job.get("input"))
    s3_config = parse_s3_config(ctx.job.get("s3Config"))
    req = inp.request()

    event = None
    if inp.is_s3_event:
        records = s3.parse_s3_event(inp.model_dump(exclude_none=True))
        fresh = [r for r in records if not s3.is_own_output(r[1])]
        if records and not fresh:  # our own upload triggered this: nothing to do
            return {"status": "skipped", "reason": "the object is this worker's own output",
                    "objects": [f"s3://{b}/{k}" for b, k in records]}
        if not records:  # e.g. ObjectRemoved: nothing to separate
            return {"status": "skipped", "reason": "the event has no ObjectCreated record"}
        if len(fresh) != 1:
            raise InvalidInput("the S3 event must carry exactly one ObjectCreated record")
        event = fresh[0]

    # Everything that can be checked before spending time on a download is checked here.
    destination = _destination(inp, s3_config, ctx, event)
    model = get_model(req.model or config.default_model())
    validate(req, model)
    stems = resolve_stems(model, req.stems)
    if not req.interval_cut:
        destination.check(len(stems), stems)
    timings: dict[str, float] = {}

    # fetch
    t0 = time.perf_counter()
    ctx.report("download", 0, 1)
    src = work / "input"
    max_bytes = config.max_download_bytes()

    def on_bytes(done: int, total: int | None) -> None:
        ctx.report("download", done, total or 0)

    if inp.audio_url is not None:
        download(inp.audio_url, src, max_bytes=max_bytes, allow_private=config.allow_private_urls(),
                 on_progress=on_bytes)
    elif inp.audio_base64 is not None:
        src.write_bytes(decode_base64_audio(
            inp.audio_base64, config.env_int("MAX_BASE64_INPUT_MB", 10) * 1024 * 1024))
    else:
        if event is not None:
            bucket, key = event
            settings = s3.S3Settings.from_env()
        else:
            assert inp.s3_uri is not None
            bucket, key = s3.parse_s3_uri(inp.s3_uri)
            settings = s3.S3Settings.from_env()
        client = s3.make_client(settings)
        s3.download_object(client, bucket, key, src, max_bytes=max_bytes)
    timings["download"] = time.perf_counter() - t0

    # decode → separate → encode
    ctx.report("decode", 0, 1)
    result: SeparationResult = separate_file(
        src, work / "out", req, progress=ctx.report, should_stop=ctx.cancel.is_set,
    )
    src.unlink(missing_ok=True)  # free the temp disk before uploading
    destination.check(len(result.outputs))

    # store
    t0 = time.perf_counter()
    outputs = []
    for i, output in enumerate(result.outputs):
        ctx.report("upload", i, len(result.outputs))
        name = output.file.path.stem
        stored = destination.store(output, name)
        outputs.append({"stem": output.stem, **stored, **output.describe()})
        output.file.path.unlink(missing_ok=True)
    timings["upload"] = time.perf_counter() - t0
    timings.update({k: v for k, v in result.timings_s.items() if k != "download"})
    timings["total"] = time.perf_counter() - started

    final = {
        "status": "completed",
        "audio_url": outputs[0]["url"] if outputs else None,
        "outputs": outputs,
        "model": result.model,
        "input_duration_s": round(result.input_duration_s, 6),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    if result.warnings:
        final["warnings"] = result.warnings
    if event is not None:
        final["source"] = f"s3://{event[0]}/{event[1]}"
    return final


def run_job(job: dict, cancel: threading.Event | None = None) -> Iterator[dict]:
    """The RunPod generator handler's body: progress items, then one final item.

    ``cancel``, set from any thread, stops the job within one chunk (final item CANCELLED).
    """
    ctx = _Context(job, cancel)
    try:
        work = Path(tempfile.mkdtemp(prefix=f"job-{ctx.job_id}-", dir=config.work_dir()))
    except Exception as exc:  # noqa: BLE001 - still exactly one final item, never a raise
        log.error("job %s: cannot create its work directory", ctx.job_id, exc_info=True)
        yield {"error": str(InternalError(
            f"the worker's WORK_DIR is not usable ({type(exc).__name__})"))}
        return
    started = time.monotonic()

    def target() -> None:
        try:
            ctx.events.put(("result", _execute(ctx, work)))
        except BaseException as exc:  # noqa: BLE001 - reported as a typed error
            err = as_worker_error(exc)
            if not isinstance(exc, WorkerError):
                log.error("job %s failed unexpectedly", ctx.job_id, exc_info=True)
            ctx.events.put(("error", err))

    thread = threading.Thread(target=target, name=f"job-{ctx.job_id}", daemon=True)
    thread.start()
    emitted = 0
    last_emit = float("-inf")
    last_stage = None
    pending: _Event | None = None
    segments = (0, 0)
    try:
        while True:
            try:
                item = ctx.events.get(timeout=0.25)
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
            if pending is None:
                continue
            now = time.monotonic()
            elapsed = now - started
            # At most ~1 item a second, sparser on long jobs, and a hard cap in all.
            interval = max(config.env_float("PROGRESS_INTERVAL_S", 1.0), elapsed / 50)
            stage_changed = pending.stage != last_stage
            if emitted < MAX_PROGRESS_EVENTS and (stage_changed or now - last_emit >= interval):
                yield _progress_item(pending, elapsed, segments)
                emitted += 1
                last_emit = now
                last_stage = pending.stage
                pending = None
    finally:
        ctx.cancel.set()  # a closed generator (cancel, timeout) stops the pipeline
        thread.join(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def _progress_item(ev: _Event, elapsed: float, segments: tuple[int, int]) -> dict:
    lo, hi = STAGE_SPAN.get(ev.stage, (0.0, 1.0))
    frac = min(1.0, ev.done / ev.total) if ev.total else 0.0
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
    return item
