"""Helpers for the HTTP service tests (test_server_*.py): the server in a thread (uvicorn, in
this process) or as a subprocess (``python -m handler.server``), and a webhook receiver.
Everything binds 127.0.0.1 and is stopped by the test that started it."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
import soundfile as sf
from fixtures_audio import chord_signal
from worker_helpers import ROOT, b64, free_port, input_bytes, worker_env

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


def long_wav(seconds: float) -> bytes:
    """A long input (several chunks), cheap to make: chords, not the synthetic song."""
    buf = io.BytesIO()
    sf.write(buf, chord_signal(seconds, 44100, 2).T, 44100, format="WAV")
    return buf.getvalue()


def short_input(seconds: float = 0.5, seed: int = 0) -> dict:
    data, _ = input_bytes(seconds, seed=seed)
    return {"audio_base64": b64(data)}


class Client:
    """requests against one server, with its token."""

    def __init__(self, url: str, token: str | None = None):
        self.url = url
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.session.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.session.post(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def run(self, job_input: dict, **body: Any) -> str:
        resp = self.post("/run", json={"input": job_input, **body})
        assert resp.status_code == 200, resp.text
        return resp.json()["id"]

    def status(self, job_id: str) -> dict:
        resp = self.get(f"/status/{job_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()

    def wait(self, job_id: str, until: Any = None, timeout_s: float = 90) -> dict:
        """Poll until ``until(job)`` (default: a terminal state)."""
        until = until or (lambda j: j["status"] in TERMINAL)
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.status(job_id)
            if until(job):
                return job
            assert time.monotonic() < deadline, f"job {job_id} stuck: {job}"
            time.sleep(0.1)

    def wait_separating(self, job_id: str, timeout_s: float = 90) -> dict:
        """Until the job is in its separate stage (mid-job)."""
        return self.wait(job_id, lambda j: j["status"] in TERMINAL or (
            (j.get("progress") or {}).get("stage") == "separate"), timeout_s)


class ThreadServer:
    """The app under uvicorn in a thread of this process (the loaded model is shared across
    servers; settings passed explicitly, env read as in production)."""

    def __init__(self, data_dir: Path, **overrides: Any):
        from handler.adapters.http.settings import ServerSettings

        overrides.setdefault("shutdown_grace_s", 5.0)
        self.settings = ServerSettings(data_dir=data_dir, host="127.0.0.1", port=free_port(),
                                       **overrides)
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self.app: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def service(self) -> Any:
        return self.app.state.service

    def start(self, timeout_s: float = 120) -> ThreadServer:
        import uvicorn

        from handler.adapters.http.app import create_app

        self.app = create_app(self.settings)
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.settings.port,
                             log_level="warning", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_ready(self.url, timeout_s, lambda: not self._thread.is_alive())
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=60)
            assert not self._thread.is_alive(), "the server thread did not stop"

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token)


@contextmanager
def thread_server(data_dir: Path, **overrides: Any) -> Iterator[ThreadServer]:
    server = ThreadServer(data_dir, **overrides)
    try:
        yield server.start()
    finally:
        server.stop()


def wait_ready(url: str, timeout_s: float, dead: Any = lambda: False) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert not dead(), "the server died while starting"
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"{url} not ready in {timeout_s} s"
        time.sleep(0.1)


class ProcServer:
    """``python -m handler.server`` as a subprocess (its own session, so signals reach only
    it); ``kill9`` / ``terminate`` as an orchestrator would."""

    def __init__(self, data_dir: Path, log_path: Path, port: int | None = None, **env: str):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = worker_env(**{"DATA_DIR": str(data_dir), "LOG_LEVEL": "INFO", **env})
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> ProcServer:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "handler.server", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        try:
            wait_ready(self.url, timeout_s, lambda: self.proc.poll() is not None)
        except AssertionError:
            self.kill9()
            raise AssertionError(f"server did not start:\n{self.log()}") from None
        return self

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill9()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token)


# --- a webhook receiver -----------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """Answers POSTs with ``codes`` in turn (the last repeats) and keeps what it got."""

    def __init__(self, *codes: int):
        self.codes = list(codes) or [200]
        self.received: list[Received] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with owner._lock:
                    n = len(owner.received)
                    owner.received.append(Received(dict(self.headers.items()), body,
                                                   time.monotonic()))
                code = owner.codes[min(n, len(owner.codes) - 1)]
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def wait_for(self, n: int, timeout_s: float = 30) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < n:
            assert time.monotonic() < deadline, f"{len(self.received)} of {n} deliveries"
            time.sleep(0.05)
        return list(self.received)


@contextmanager
def server_test_env() -> Iterator[None]:
    """What every server test runs under: loopback URLs allowed (audio, webhooks), one torch
    thread (the machine is shared), frequent progress items."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALLOW_PRIVATE_URLS", "1")
        mp.setenv("TORCH_THREADS", "1")
        mp.setenv("PROGRESS_INTERVAL_S", "0.2")
        yield


@contextmanager
def running_server(data_dir: Path) -> Iterator[ThreadServer]:
    """An in-process server on DATA_DIR ``data_dir``, stopped on exit."""
    srv = ThreadServer(data_dir, shutdown_grace_s=1.0)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@contextmanager
def audio_server(short_s: float, long_s: float) -> Iterator[dict[str, str]]:
    """URLs of a short clip and a long one, served from 127.0.0.1 until exit."""
    from devtools.servers import LocalHTTPServer, Serve

    server = LocalHTTPServer().start()
    try:
        yield {"short": server.route("/short.wav", Serve(input_bytes(short_s)[0])),
               "long": server.route("/long.wav", Serve(long_wav(long_s)))}
    finally:
        server.stop()

