"""Several inputs through ``--endpoint ID|URL``: RunPod serverless (or the self-hosted service)
is the distributed engine; this is only a bounded client.

At most ``concurrency`` jobs are in flight; each thread submits one input (``/run``), polls
``/status`` and downloads the outputs into the plan's paths. Requests are retried with
exponential backoff (``Retry-After`` honoured) on 429, 5xx and network errors, which is how
RunPod asks clients to respect its rate limits. On Ctrl-C every job still in flight is
cancelled (``/cancel``) before the command exits; finished inputs are in the manifest and on
disk, so the same command resumes where it stopped. A run killed outright (SIGKILL, a lost
machine) leaves its jobs running: the manifest's ``submitted`` lines let the next run attach
to them instead of submitting them again.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from handler.adapters.batch import Item, Manifest, Outcome, Plan, place, run_pool
from handler.adapters.remote import _typed, fetch_output
from handler.core.request import SeparationRequest
from handler.errors import (
    Cancelled,
    InternalError,
    InvalidInput,
    WorkerError,
    as_worker_error,
)

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
RETRY_STATUS = {429, 500, 502, 503, 504}
INLINE_MAX_BYTES = 10 * 1024 * 1024  # the worker's default MAX_BASE64_INPUT_MB


class EndpointClient:
    """RunPod's queue API with retries: ``base`` is ``https://api.runpod.ai/v2/<id>`` or a
    self-hosted server's root."""

    def __init__(self, endpoint: str, api_key: str | None, *, retries: int = 6,
                 backoff_s: float = 1.0, timeout_s: float = 60.0):
        import runpod

        self.self_hosted = endpoint.startswith(("http://", "https://"))
        self.base = (endpoint.rstrip("/") if self.self_hosted
                     else f"{runpod.endpoint_url_base}/{endpoint}")
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s

    def call(self, method: str, path: str, body: dict | None = None,
             stop: threading.Event | None = None) -> dict:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                resp = self.session.request(method, f"{self.base}/{path}", json=body,
                                            timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if last:
                    raise InternalError(f"{path.split('/')[0]}: endpoint unreachable "
                                        f"({type(exc).__name__})") from None
                self._sleep(attempt, None, stop)
                continue
            if resp.status_code in RETRY_STATUS and not last:
                self._sleep(attempt, resp.headers.get("Retry-After"), stop)
                continue
            if resp.status_code in (401, 403):
                raise InvalidInput(f"the endpoint refused the API key (HTTP {resp.status_code})")
            if resp.status_code >= 400:
                raise InternalError(f"{path.split('/')[0]}: HTTP {resp.status_code} "
                                    f"{resp.text[:200]}")
            return resp.json()
        raise AssertionError("unreachable")

    def _sleep(self, attempt: int, retry_after: str | None, stop: threading.Event | None) -> None:
        delay = min(30.0, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)
        if retry_after is not None:
            with contextlib.suppress(ValueError):
                delay = max(delay, float(retry_after))
        if stop is not None and stop.wait(delay):
            raise Cancelled("interrupted")
        if stop is None:
            time.sleep(delay)


def _job_input(item: Item, req: SeparationRequest) -> dict[str, Any]:
    """The job's audio source: a URL or s3:// passes through; a local file is uploaded to
    the worker's bucket when ``BUCKET_*`` is set, else sent inline (base64, up to 10 MB)."""
    if item.kind == "url":
        source: dict[str, str] = {"audio_url": item.source}
    elif item.kind == "s3":
        source = {"s3_uri": item.source}
    else:
        from handler.transfer import s3

        if s3.S3Settings.from_env().configured:
            from handler.adapters.remote import _source

            source = _source(item.source)
        else:
            data = Path(item.source).read_bytes()
            if len(data) > INLINE_MAX_BYTES:
                raise InvalidInput(f"{item.source} is over 10 MB: set BUCKET_* so local files "
                                   "are uploaded to the worker's bucket")
            source = {"audio_base64": base64.b64encode(data).decode()}
    return {**source, **req.as_job_input()}


def _final_item(state: dict) -> dict | None:
    output = state.get("output")
    if isinstance(output, list):
        finals = [o for o in output if isinstance(o, dict) and o.get("status") != "progress"]
        return finals[-1] if finals else None
    return output if isinstance(output, dict) else None


def _reattach(client: EndpointClient, previous: dict | None,
              stop: threading.Event) -> str | None:
    """The job a killed run left behind for this input (its last manifest line says
    ``submitted``), if the endpoint still has it queued, running or completed."""
    if not previous or previous.get("status") != "submitted" or not previous.get("job_id"):
        return None
    job_id = str(previous["job_id"])
    try:
        state = client.call("GET", f"status/{job_id}", None, stop)
    except InvalidInput:
        raise
    except WorkerError:  # gone (404: expired or purged): submit again
        return None
    return job_id if state.get("status") not in ("CANCELLED", "FAILED", "TIMED_OUT") else None


def run_fanout(endpoint: str, items: list[Item], plan: Plan, req: SeparationRequest,
               manifest: Manifest, bar: Any, *, concurrency: int = 4,
               poll_s: float = 1.0) -> list[Outcome]:
    import runpod

    api_key = os.environ.get("RUNPOD_API_KEY", "").strip() or runpod.api_key
    client = EndpointClient(endpoint, api_key)
    if not api_key and not client.self_hosted:
        raise InvalidInput("--endpoint needs RUNPOD_API_KEY set (or `runpod config`)")
    stop = threading.Event()
    in_flight: dict[str, str] = {}  # job id -> source
    lock = threading.Lock()

    def one(item: Item) -> Outcome:
        started = time.perf_counter()
        job_id: str | None = None
        try:
            job_id = _reattach(client, manifest.previous.get(item.source), stop)
            if job_id is None:
                body: dict[str, Any] = {"input": _job_input(item, req)}
                if client.self_hosted:  # a client-chosen id makes a retried /run idempotent
                    body["id"] = uuid.uuid4().hex
                job_id = client.call("POST", "run", body, stop)["id"]
                manifest.record(Outcome(item.source, "submitted", job_id=job_id))
                bar.write(f"   queued {job_id}  {item.source}", file=sys.stderr)
            else:
                bar.write(f" attached {job_id}  {item.source}", file=sys.stderr)
            with lock:
                in_flight[job_id] = item.source
            state: dict = {}
            while state.get("status") not in FINAL:
                if stop.wait(poll_s):
                    raise Cancelled("interrupted")
                state = client.call("GET", f"status/{job_id}", None, stop)
            with lock:
                in_flight.pop(job_id, None)
            final = _final_item(state)
            if state["status"] != "COMPLETED" or final is None or "error" in final:
                error = ((final or {}).get("error") or state.get("error")
                         or f"INTERNAL: the job ended {state['status']}")
                raise _typed(str(error))
            written = []
            for out in final.get("outputs", []):
                dest = plan.path(item, out.get("stem", "output"), out.get("interval"))
                tmp = dest.with_name(f".{dest.name}.download")
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fetch_output(out.get("url") or "", tmp, dest.name, client.session)
                    place(tmp, dest)
                finally:
                    tmp.unlink(missing_ok=True)
                written.append(str(dest))
            return Outcome(item.source, "done", written, seconds=time.perf_counter() - started,
                           job_id=job_id)
        except Exception as exc:  # one input's failure never stops the others
            status = "cancelled" if isinstance(exc, Cancelled) else "failed"
            return Outcome(item.source, status, error=str(as_worker_error(exc)),
                           seconds=time.perf_counter() - started, job_id=job_id)

    def cancel_in_flight() -> None:
        stop.set()
        with lock:
            jobs = list(in_flight)
        for job_id in jobs:  # best effort, once each: the user is waiting to exit
            with contextlib.suppress(requests.RequestException):
                client.session.post(f"{client.base}/cancel/{job_id}", json={}, timeout=10)

    return run_pool(items, one, concurrency, manifest, bar, name="job",
                    on_interrupt=cancel_in_flight,
                    line=lambda o: f"{o.status:>9} {o.job_id or '-'}  {o.seconds:6.1f} s  "
                                   f"{o.source}")
