"""The FastAPI app: the service object (store, runner, webhook sender, janitor), auth and
limits, probes, and the route modules mounted where their clients expect them."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from handler import __version__, config
from handler.adapters.http import routes_legacy, routes_results, routes_runpod
from handler.adapters.http.runner import Runner
from handler.adapters.http.settings import ServerSettings
from handler.adapters.http.store import QUEUED, RUNNING, Job, JobStore
from handler.adapters.http.views import webhook_body
from handler.adapters.http.webhooks import Sender, check_target
from handler.errors import WorkerError

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
PUBLIC_PATHS = {"/", "/health", "/ping", "/livez", "/readyz", "/docs", "/redoc", "/openapi.json",
                "/docs/oauth2-redirect"}
_PUBLIC_V2 = re.compile(r"^/v2/[^/]+/health$")


class Service:
    """Everything the routes share; one per process."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(settings.data_dir / "jobs.sqlite3", webhook_body)
        self.signing_key = _signing_key(settings.data_dir / "result-signing.key")
        self.runner = Runner(self.store, settings, self.signing_key)
        self.sender = Sender(self.store, settings)
        self.model_ready = False
        self.model_error: str | None = None
        self.draining = False
        self.started = time.time()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        requeued, failed = self.store.recover(self.settings.max_attempts)
        if requeued or failed:
            swept = self.runner.sweep(requeued + failed)
            log.warning("restart: re-queued %d interrupted job(s), failed %d; removed %d work "
                        "folder(s) they left", len(requeued), len(failed), swept)
        if not self.settings.tokens:
            log.warning("!" * 72)
            log.warning("API_TOKEN is not set: every route is open to anyone who can reach "
                        "this port. Set API_TOKEN (or REQUIRE_AUTH=1 to refuse to start).")
            log.warning("!" * 72)
        for target, name in ((self._warm_up, "warm-up"), (self._janitor, "janitor")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.runner.start()
        self.sender.start()

    def drain(self) -> bool:
        """SIGTERM: stop taking jobs, let the running one finish within the grace period."""
        self.draining = True
        log.info("draining: no new jobs; waiting up to %g s for %d running job(s)",
                 self.settings.shutdown_grace_s, self.runner.active)
        finished = self.runner.drain(self.settings.shutdown_grace_s)
        if not finished:
            log.warning("grace period over: the running job is re-queued for the next start")
        return finished

    def stop(self) -> None:
        if not self.draining:
            self.drain()
        self._stop.set()
        self.sender.stop()
        self.store.close()

    def _warm_up(self) -> None:
        """The worker's own cold start: REQUIRE_CUDA check, then the default model."""
        from handler.handler import warm_up

        try:
            warm_up()
            self.model_ready = True
        except SystemExit as exc:  # REQUIRE_CUDA without a usable GPU
            self.model_error = str(exc.code)
        except Exception as exc:  # noqa: BLE001 - reported by /health, not fatal to the server
            self.model_error = str(exc) if isinstance(exc, WorkerError) else type(exc).__name__
        if self.model_error:
            log.error("not ready: %s (/health says unhealthy, /readyz 503)", self.model_error)

    def _janitor(self) -> None:
        while not self._stop.wait(self.settings.janitor_interval_s):
            try:
                self.clean()
            except Exception:  # noqa: BLE001 - try again next round
                log.exception("janitor round failed")

    def clean(self) -> int:
        """Delete jobs (rows and result files) past the retention; queued ones past their ttl
        time out. Returns how many were deleted."""
        gone = self.store.expired(time.time(), self.settings.result_retention_s)
        for job_id in gone:
            shutil.rmtree(self.settings.results_dir / job_id, ignore_errors=True)
            self.store.delete(job_id)
        return len(gone)

    # --- jobs ----------------------------------------------------------------------------

    def submit(self, request: Request, *, kind: str, job_input: Any,
               s3_config: Any = None, webhook: str | None = None,
               policy: dict | None = None, job_id: str | None = None) -> tuple[Job, bool]:
        """Queue a job; returns (job, created). A known client id returns the existing job."""
        if not isinstance(job_input, dict):
            raise HTTPException(400, "the body needs an 'input' object")
        if job_id is not None:
            if not _ID.match(job_id):
                raise HTTPException(400, "id: 1-100 characters of A-Z a-z 0-9 . _ - "
                                         "(starting with a letter or digit)")
            existing = self.store.get(job_id)
            if existing is not None:
                return existing, False
        if self.draining:
            raise HTTPException(503, "the server is shutting down", {"Retry-After": "30"})
        queued = self.store.counts().get(QUEUED, 0)
        if queued >= self.settings.max_queue:
            per_job = self.store.mean_duration_s()
            wait = per_job * (queued + 1) / self.settings.max_concurrency
            raise HTTPException(429, f"the queue is full ({queued} jobs)",
                                {"Retry-After": str(max(1, int(wait)))})
        if webhook is not None:
            try:
                check_target(webhook)
            except WorkerError as exc:
                raise HTTPException(400, f"webhook: {exc.message}") from None
        policy = policy or {}
        timeout_s = self.settings.execution_timeout_s
        ttl_s = self.settings.job_ttl_s
        try:
            if policy.get("executionTimeout") is not None:
                timeout_s = max(1.0, float(policy["executionTimeout"]) / 1000)
            if policy.get("ttl") is not None:
                ttl_s = max(1.0, float(policy["ttl"]) / 1000)
        except (TypeError, ValueError):
            raise HTTPException(400, "policy.executionTimeout and policy.ttl are milliseconds"
                                ) from None
        req: dict[str, Any] = {"input": job_input}
        if s3_config is not None:
            req["s3Config"] = s3_config
        job = self.store.create(
            job_id or uuid.uuid4().hex, kind=kind, request=req, webhook=webhook,
            base_url=str(request.base_url).rstrip("/"), execution_timeout_s=timeout_s,
            ttl_s=ttl_s)
        self.runner.wake()
        return job, True

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id!r} not found")
        return job

    async def wait(self, job_id: str, seconds: float, cap: float | None = None) -> Job:
        """The job once terminal, or as it is after ``seconds`` (at most ``cap``, by default
        SYNC_MAX_WAIT_S)."""
        cap = self.settings.sync_max_wait_s if cap is None else cap
        deadline = time.monotonic() + max(0.0, min(seconds, cap))
        delay = 0.05
        while True:
            job = self.get(job_id)
            if job.terminal or time.monotonic() >= deadline:
                return job
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.5)

    def health(self) -> dict[str, Any]:
        counts = self.store.counts()
        import torch

        cuda = torch.cuda.is_available()
        status = ("draining" if self.draining else "unhealthy" if self.model_error
                  else "healthy" if self.model_ready else "starting")
        return {
            "status": status,
            "model": config.default_model(),
            "hardware": "GPU" if cuda else "CPU",
            "torch_version": torch.__version__,
            "cuda_available": cuda,
            "device": torch.cuda.get_device_name(0) if cuda else "CPU",
            "models_ready": self.model_ready,
            "model_error": self.model_error,
            "version": __version__,
            "jobs": {"completed": counts.get("COMPLETED", 0), "failed": counts.get("FAILED", 0)
                     + counts.get("TIMED_OUT", 0), "inProgress": counts.get(RUNNING, 0),
                     "inQueue": counts.get(QUEUED, 0), "retried": 0},
            "workers": {"idle": max(0, self.settings.max_concurrency - self.runner.active),
                        "running": self.runner.active, "ready": int(self.model_ready),
                        "initializing": int(not self.model_ready and not self.model_error),
                        "throttled": 0, "unhealthy": int(bool(self.model_error))},
            "max_concurrency": self.settings.max_concurrency,
            "uptime_s": round(time.time() - self.started, 1),
        }

    # --- auth ----------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        if not self.settings.tokens:
            return True
        given = request.headers.get("authorization", "").strip()
        if given.lower().startswith("bearer "):
            given = given[7:].strip()
        return any(hmac.compare_digest(given.encode(), t.encode()) for t in self.settings.tokens)


def _signing_key(path: Path) -> bytes:
    """A random key kept beside the database, so result URLs stay valid across restarts."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        key = secrets.token_bytes(32)
        path.write_text(key.hex())
        path.chmod(0o600)
        return key


class BodyLimit:
    """413 for a body over ``MAX_UPLOAD_MB``, declared or streamed (uvicorn sets no limit)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = JSONResponse({"detail": f"the body is larger than the {self.max_bytes} byte "
                                "limit (MAX_UPLOAD_MB); pass audio_url instead"}, 413,
                               headers={"Connection": "close"})
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await too_big(scope, receive, send)
            return
        seen = 0
        started = responded = False

        async def counting_receive() -> dict:
            nonlocal seen, responded
            message = await receive()
            if message["type"] == "http.request" and not responded:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    responded = True
                    if not started:
                        await too_big(scope, receive, send)
                    return {"type": "http.disconnect"}  # the app stops reading
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if responded:
                return  # the 413 was the answer
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not responded:
                raise


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="separation-worker", version=__version__, lifespan=lifespan,
                  description="Vocal/instrumental separation: RunPod's job API, self-hosted.")
    app.state.service = service

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Response:
        path = request.url.path
        public = (path in PUBLIC_PATHS or _PUBLIC_V2.match(path)
                  or path.startswith("/result/"))  # checks its own signature or token
        if not public and not service.authorized(request):
            return JSONResponse({"detail": "missing or wrong API token"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/ping", include_in_schema=False)
    def ping() -> Response:
        """RunPod's load-balancer probe: 200 ready, 204 initializing; the Docker HEALTHCHECK."""
        return Response(status_code=200 if service.model_ready else 204)

    @app.get("/livez", include_in_schema=False)
    def livez() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        ready = service.model_ready and not service.draining
        reason = ("draining" if service.draining else "model loading" if not service.model_ready
                  else "ready")
        return JSONResponse({"ready": ready, "reason": reason}, 200 if ready else 503)

    @app.get("/")
    def root() -> dict:
        """Service information (the CPU predecessor's ``GET /``) and a map of the routes."""
        return {
            "service": "separation-worker", "version": __version__,
            "model": config.default_model(), "status": service.health()["status"],
            "auth": "bearer token" if settings.tokens else "none",
            "routes": sorted(app.openapi()["paths"]),
            "docs": "/docs",
        }

    app.include_router(routes_runpod.router)
    app.include_router(routes_runpod.router, prefix="/v2/{endpoint_id}")
    app.include_router(routes_results.router)
    if settings.legacy_routes:
        app.include_router(routes_legacy.router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)  # outermost
    return app
