"""Results kept on this server's disk (no bucket, ``s3Config`` or ``output_urls`` given):
``GET /result/{id}/{name}`` with Range, and the GPU predecessor's ``GET /result/{id}`` (the
first output's bytes, never a redirect: its documented client is ``curl -o`` without ``-L``).

Each URL a job returns carries ``?sig=``, a per-job HMAC made with this server's key, so it
can be fetched like a presigned URL; without it, the API token is needed."""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, StreamingResponse

from handler.adapters.http.runner import result_signature
from handler.adapters.http.views import final_item

router = APIRouter(tags=["results"])

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MEDIA = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac"}


def _allowed(request: Request, job_id: str, sig: str | None) -> None:
    service = request.app.state.service
    if sig and hmac.compare_digest(sig, result_signature(service.signing_key, job_id)):
        return
    if not service.authorized(request):
        raise HTTPException(401, "missing or wrong API token (or result signature)",
                            {"WWW-Authenticate": "Bearer"})


def _local_file(request: Request, job_id: str, name: str) -> Path | None:
    if not _NAME.match(job_id) or not _NAME.match(name):
        return None
    folder = request.app.state.service.settings.results_dir / job_id
    for ext in MEDIA:
        path = folder / f"{name}.{ext}"
        if path.is_file():
            return path
    return None


def _send(path: Path, job_id: str) -> FileResponse:
    ext = path.suffix.lstrip(".")
    return FileResponse(path, media_type=MEDIA.get(ext, "application/octet-stream"),
                        filename=f"{job_id}-{path.name}")


@router.get("/result/{job_id}/{name}")
def result_file(request: Request, job_id: str, name: str,
                sig: str | None = Query(None)) -> FileResponse:
    """One output by name (``instrumental``, ``vocals``, ``instrumental_000`` ...)."""
    _allowed(request, job_id, sig)
    path = _local_file(request, job_id, name)
    if path is None:
        raise HTTPException(404, f"job {job_id!r} has no output {name!r} on this server")
    return _send(path, job_id)


@router.get("/result/{job_id}", response_model=None)
def result_first(request: Request, job_id: str,
                 sig: str | None = Query(None)) -> FileResponse | StreamingResponse:
    """The job's first output (the instrumental by default): its bytes, from this server's
    disk or proxied from the bucket."""
    _allowed(request, job_id, sig)
    service = request.app.state.service
    job = service.get(job_id)
    final = final_item(service.store, job)
    if final is None or not final.get("outputs"):
        raise HTTPException(404 if job.terminal else 409,
                            f"job {job_id!r} is {job.status}: no result to download")
    first = final["outputs"][0]
    name = Path(str(first.get("url", "")).split("?", 1)[0]).name
    local = _local_file(request, job_id, name)
    if local is not None and f"/result/{job_id}/" in str(first.get("url", "")):
        return _send(local, job_id)
    url = str(first.get("url") or "")
    if not url.startswith(("http://", "https://")):
        raise HTTPException(404, "the result is not downloadable from this server")
    upstream = requests.get(url, stream=True, timeout=60)
    if upstream.status_code != 200:
        upstream.close()
        raise HTTPException(502, f"the result's storage answered HTTP {upstream.status_code}")

    def body() -> Iterator[bytes]:
        with upstream:
            yield from upstream.iter_content(1 << 16)

    headers: dict[str, Any] = {}
    if upstream.headers.get("Content-Length"):
        headers["Content-Length"] = upstream.headers["Content-Length"]
    return StreamingResponse(body(), media_type=MEDIA.get(first.get("format"), "audio/mpeg"),
                             headers=headers)
