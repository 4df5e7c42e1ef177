"""``demucs-separate --endpoint ID|URL``: run the job on a deployed RunPod endpoint, or on a
self-hosted server (``python -m handler.server``) given by its base URL.

A local file is uploaded to the worker's bucket first (``BUCKET_*`` env, as the worker uses),
the job is submitted with the runpod SDK's endpoint client (``RUNPOD_API_KEY``), streamed
progress is shown, and the outputs are downloaded into the output directory.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from handler.core.request import SeparationRequest, output_name
from handler.errors import DownloadFailed, InternalError, InvalidInput, WorkerError
from handler.transfer import keys, s3

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


def _source(source: str) -> dict[str, str]:
    if source.startswith(("http://", "https://")):
        return {"audio_url": source}
    path = Path(source).expanduser()
    if not path.is_file():
        raise InvalidInput(f"input file not found: {source}")
    settings = s3.S3Settings.from_env()
    if not settings.configured:
        raise InvalidInput("uploading a local file needs BUCKET_NAME/BUCKET_* set "
                           "(or pass an http(s) URL as --input)")
    client = s3.make_client(settings)
    assert settings.bucket is not None
    key = keys.output_key(settings.prefix, "inputs", uuid.uuid4().hex, "")
    key = f"{key.rstrip('.')}{path.suffix}"
    s3.upload_file(client, path, settings.bucket, key, "application/octet-stream")
    return {"s3_uri": f"s3://{settings.bucket}/{key}"}


def run_remote(
    endpoint_id: str, source: str, out_dir: Path, req: SeparationRequest, *,
    quiet: bool = False, poll_s: float = 1.0, timeout_s: float = 6 * 3600,
) -> list[Path]:
    import runpod
    from runpod.endpoint.runner import RunPodClient

    # The SDK itself reads only ~/.runpod/config.toml, not the environment.
    api_key = os.environ.get("RUNPOD_API_KEY", "").strip() or runpod.api_key
    self_hosted = endpoint_id.startswith(("http://", "https://"))
    if not api_key and not self_hosted:
        raise InvalidInput("--endpoint needs RUNPOD_API_KEY set (or `runpod config`)")
    # A self-hosted server takes the same key as its bearer token (none if it has no API_TOKEN).
    client = RunPodClient(api_key=api_key or "none")
    prefix = f"{endpoint_id}/"
    if self_hosted:  # its job API is at the root (and at /v2/<anything>/)
        client.endpoint_url_base = endpoint_id.rstrip("/")
        prefix = ""
    payload = {"input": {**_source(source), **req.as_job_input()}}
    job_id = client.post(f"{prefix}run", payload)["id"]
    try:
        final = _follow(client, prefix, job_id, quiet, poll_s, timeout_s)
    except KeyboardInterrupt:  # Ctrl-C: the job stops too (best effort, one request)
        with contextlib.suppress(Exception):
            client.post(f"{prefix}cancel/{job_id}", {}, timeout=10)
        raise
    if "error" in final:
        raise _typed(str(final["error"]))
    return _download_outputs(final, out_dir)


def _follow(client: Any, prefix: str, job_id: str, quiet: bool, poll_s: float,
            timeout_s: float) -> dict:
    """Poll the job until its final item, printing streamed progress."""
    poll = _Poller(client)
    final: dict | None = None
    deadline = time.monotonic() + timeout_s
    while final is None:
        if time.monotonic() > deadline:
            raise InternalError(f"job {job_id} did not finish in {timeout_s:.0f} s")
        time.sleep(poll_s)
        state = poll(f"{prefix}stream/{job_id}")
        for chunk in state.get("stream") or []:
            item = chunk.get("output", chunk)
            if isinstance(item, dict) and item.get("status") == "progress":
                if not quiet:
                    print(f"[{item.get('stage', ''):>8}] {100 * item.get('progress', 0):5.1f}%",
                          file=sys.stderr, flush=True)
            elif isinstance(item, dict):
                final = item
        status = state.get("status")
        if final is None and status in FINAL:
            if state.get("error"):
                raise WorkerError(str(state["error"]))
            result = poll(f"{prefix}status/{job_id}")
            output = result.get("output")
            final = output[-1] if isinstance(output, list) and output else output
            if final is None:
                raise InternalError(f"job {job_id} ended {status} with no output")
    return final


class _Poller:
    """GET ``/stream`` and ``/status`` as the hosted API wants; the SDK's local API server
    (``--rp_serve_api``) answers those with POST only (405 to a GET), so switch once then.
    Its ``/stream`` runs the whole job in the call, hence the long read timeout."""

    def __init__(self, client: Any, timeout_s: int = 3600):
        self.client = client
        self.timeout_s = timeout_s
        self.method = "GET"

    def __call__(self, path: str) -> dict:
        if self.method == "GET":
            try:
                return self.client.get(path, timeout=self.timeout_s)
            except requests.HTTPError as exc:
                if exc.response is None or exc.response.status_code != 405:
                    raise
                self.method = "POST"
        return self.client.post(path, {}, timeout=self.timeout_s)


def _typed(text: str) -> WorkerError:
    """Re-raise the worker's ``CODE: message`` under the same code."""
    err = WorkerError(text.split(": ", 1)[1] if ": " in text else text)
    err.code = text.split(": ", 1)[0] if ": " in text else "INTERNAL"
    return err


def _download_outputs(final: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for output in final.get("outputs", []):
        name = output_name(output.get("stem", "output"), output.get("interval"))
        dest = out_dir / f"{name}.{output.get('format', 'mp3')}"
        fetch_output(output.get("url") or "", dest, name)
        paths.append(dest)
    return paths


def fetch_output(url: str, dest: Path, name: str, session: Any = requests) -> None:
    """Save one output of a finished job (an http(s) or ``data:`` URL) at ``dest``."""
    if url.startswith("data:"):
        import base64

        dest.write_bytes(base64.b64decode(url.split(",", 1)[1]))
        return
    with session.get(url, stream=True, timeout=60) as resp:
        if resp.status_code != 200:
            raise DownloadFailed(f"HTTP {resp.status_code} fetching output {name}")
        with open(dest, "wb") as f:
            for block in resp.iter_content(1 << 20):
                f.write(block)
