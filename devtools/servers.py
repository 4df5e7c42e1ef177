"""Real local servers for tests, the bench and the demo: a scriptable HTTP server and S3
servers (moto; s3rver, which also refuses expired presigned URLs).

Both bind 127.0.0.1 on a free port. Code under test reaches them over real sockets, so
redirects, timeouts, truncated bodies and resets behave exactly as on the network.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

# --- scriptable HTTP server --------------------------------------------------------------
# A route is a list of responses: hit N gets responses[N] (the last one repeats), so
# "fail twice, then succeed" is route(path, Status(500), Status(500), Serve(body)).


@dataclass
class Serve:
    """200 with ``body``; ``length=False`` omits Content-Length (body ends at close)."""

    body: bytes
    content_type: str = "application/octet-stream"
    length: bool = True
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Status:
    code: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Redirect:
    location: str
    code: int = 302


@dataclass
class Stall:
    """Headers (and ``after_bytes`` of the body), then silence for ``delay_s``, then the rest."""

    body: bytes
    delay_s: float
    after_bytes: int = 0


@dataclass
class LyingLength:
    """Declares ``declared`` bytes in Content-Length, sends ``body`` (fewer), then closes."""

    body: bytes
    declared: int


@dataclass
class Reset:
    """Declares len(body), sends ``after_bytes`` of it, then resets the connection (RST).
    To a PUT: reads ``after_bytes`` of the request body, then resets (``body`` unused)."""

    body: bytes
    after_bytes: int


@dataclass
class Html:
    text: str = "<!doctype html><html><body><h1>Sign in</h1></body></html>"


@dataclass
class AcceptPut:
    """Stores a PUT body in ``server.uploads[path]`` and answers ``status``."""

    status: int = 200


Response = Serve | Status | Redirect | Stall | LyingLength | Reset | Html | AcceptPut


@dataclass
class Upload:
    body: bytes
    headers: dict[str, str]


@dataclass
class SeenRequest:
    method: str
    path: str  # with query string
    headers: dict[str, str]


class LocalHTTPServer:
    def __init__(self) -> None:
        self.routes: dict[str, list[Response]] = {}
        self.counts: Counter[str] = Counter()
        self.uploads: dict[str, Upload] = {}
        self.requests: list[SeenRequest] = []
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> LocalHTTPServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()  # wakes stalled responses
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def url(self, path: str) -> str:
        return self.base_url + path

    def route(self, path: str, *responses: Response) -> str:
        """Register ``responses`` for ``path`` (query strings are ignored); returns its URL."""
        if not responses:
            raise ValueError("route needs at least one response")
        with self._lock:
            self.routes[path] = list(responses)
            self.counts[path] = 0
        return self.url(path)

    def hits(self, path: str) -> int:
        return self.counts[path]

    def _next(self, path: str) -> Response | None:
        with self._lock:
            responses = self.routes.get(path)
            if responses is None:
                return None
            n = self.counts[path]
            self.counts[path] += 1
            return responses[min(n, len(responses) - 1)]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response (size caps, timeouts) is what the tests provoke.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep pytest output clean

    @property
    def owner(self) -> LocalHTTPServer:
        return self.server.owner

    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_PUT(self) -> None:
        path = urlsplit(self.path).path
        response = self._record_and_next()
        if isinstance(response, Reset):  # mid-upload: read after_bytes of the body, then RST
            self.rfile.read(min(response.after_bytes,
                                int(self.headers.get("Content-Length") or 0)))
            self._reset()
            return
        body = self._read_body()  # always drain: answering before reading resets the client
        if isinstance(response, AcceptPut):
            self.owner.uploads[path] = Upload(body, dict(self.headers.items()))
            self._simple(response.status, b"")
        elif isinstance(response, Status):
            self._simple(response.code, response.body, response.headers)
        else:
            self._simple(405 if response else 404, b"")

    def _record_and_next(self) -> Response | None:
        self.owner.requests.append(
            SeenRequest(self.command, self.path, dict(self.headers.items()))
        )
        return self.owner._next(urlsplit(self.path).path)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _simple(
        self, code: int, body: bytes, headers: dict[str, str] | None = None,
        content_type: str = "application/octet-stream", *, head: bool = False,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _handle(self, *, head: bool) -> None:
        r = self._record_and_next()
        if r is None:
            self._simple(404, b"no such route")
        elif isinstance(r, Serve) and r.length:
            self._simple(200, r.body, r.headers, r.content_type, head=head)
        elif isinstance(r, Serve):
            self.send_response(200)
            self.send_header("Content-Type", r.content_type)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if not head:
                self.wfile.write(r.body)
        elif isinstance(r, Status):
            self._simple(r.code, r.body, r.headers, head=head)
        elif isinstance(r, Redirect):
            self._simple(r.code, b"", {"Location": r.location}, head=head)
        elif isinstance(r, Html):
            self._simple(200, r.text.encode(), None, "text/html; charset=utf-8", head=head)
        elif isinstance(r, Stall):
            self._partial(r.body, len(r.body), r.after_bytes)
            if not self.owner.stop_event.wait(r.delay_s):
                self.wfile.write(r.body[r.after_bytes:])
            self.close_connection = True
        elif isinstance(r, LyingLength):
            self._partial(r.body, r.declared, len(r.body))
            self.close_connection = True
        elif isinstance(r, Reset):
            self._partial(r.body, len(r.body), r.after_bytes)
            self._reset()
        else:
            self._simple(405, b"")

    def _partial(self, body: bytes, declared: int, send: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        self.wfile.write(body[:send])
        self.wfile.flush()

    def _reset(self) -> None:
        # Linger 0 + close sends RST instead of FIN. Close the fd now: the server's own
        # shutdown(SHUT_WR) afterwards would send a polite FIN first.
        sock = self.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.close(sock.detach())
        self.close_connection = True


# --- S3 server (moto) --------------------------------------------------------------------


class LocalS3Server:
    """moto's S3 over real HTTP. Credentials are dummies: moto accepts any."""

    access_key_id = "AKIATESTTESTTEST0001"
    secret_access_key = "test-secret-key-0123456789abcdefghijklmnop"
    region = "us-east-1"

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint_url = ""
        self._client: Any = None

    def start(self) -> LocalS3Server:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def bucket_env(self, bucket: str) -> dict[str, str]:
        return bucket_env(self.endpoint_url, bucket)

    def client(self, **config: Any) -> Any:
        """A boto3 client for this server (path-style, dummy credentials); shared when
        called without botocore Config options (building one costs ~0.5 s)."""
        import boto3
        from botocore.config import Config

        if not config and self._client is not None:
            return self._client
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, **config),
        )
        if not config:
            self._client = client
        return client

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default: the server outlives tests)."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def settings(self, bucket: str, **overrides: Any) -> Any:
        """handler.transfer.s3.S3Settings pointing at this server and ``bucket``."""
        from handler.transfer.s3 import S3Settings

        values: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "bucket": bucket,
            "region": self.region,
            "prefix": "separations",
            "presign_expiry_s": 3600,
        }
        values.update(overrides)
        return S3Settings(**values)


def bucket_env(endpoint_url: str, bucket: str) -> dict[str, str]:
    """The worker's ``BUCKET_*`` settings for ``bucket`` at ``endpoint_url`` with moto's dummy
    credentials, and the same as ``AWS_*`` so nothing can reach real AWS. (Presigned URLs of a
    local server are on 127.0.0.1: jobs fetching them also need ALLOW_PRIVATE_URLS.)"""
    key, secret = LocalS3Server.access_key_id, LocalS3Server.secret_access_key
    return {
        "BUCKET_ENDPOINT_URL": endpoint_url, "BUCKET_NAME": bucket,
        "BUCKET_ACCESS_KEY_ID": key, "BUCKET_SECRET_ACCESS_KEY": secret,
        "BUCKET_REGION": LocalS3Server.region,
        "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": LocalS3Server.region,
    }


# --- S3 server that enforces presigned-URL expiry (s3rver, npm) ---------------------------

S3RVER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "s3rver")
S3RVER_JS = os.path.join(S3RVER_DIR, "node_modules", "s3rver", "bin", "s3rver.js")


class LocalS3rver:
    """s3rver (pinned in devtools/s3rver/package-lock.json; ``npm ci --prefix devtools/s3rver``)
    on 127.0.0.1. Unlike moto it checks signatures and refuses expired presigned URLs.
    Credentials are s3rver's fixed ``S3RVER``/``S3RVER``."""

    access_key_id = secret_access_key = "S3RVER"

    @staticmethod
    def missing() -> str | None:
        """Why it can't run here, or None."""
        import shutil

        if shutil.which("node") is None:
            return "node is not installed"
        if not os.path.isfile(S3RVER_JS):
            return "s3rver is not installed: run `npm ci --prefix devtools/s3rver`"
        return None

    def __init__(self, bucket: str = "inbox") -> None:
        import tempfile

        self.bucket = bucket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._data = tempfile.mkdtemp(prefix="s3rver-")
        self._proc: Any = None

    def start(self, timeout_s: float = 30.0) -> LocalS3rver:
        import subprocess
        import time

        self._proc = subprocess.Popen(
            ["node", S3RVER_JS, "-d", self._data, "-a", "127.0.0.1", "-p", str(self.port),
             "--silent", "--configure-bucket", self.bucket],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("s3rver did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        import shutil
        import subprocess

        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        shutil.rmtree(self._data, ignore_errors=True)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key, region_name="us-east-1",
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )
