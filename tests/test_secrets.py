"""Secrets stay secret: presigned query strings (input URLs, output_urls, the worker's own
result URLs), s3Config credentials and the worker's env credentials never appear in what the
worker prints or logs, at any level, successful jobs and failures alike; nor in a job's output,
except the worker's own result URLs (the caller needs those).

Two ways in: the API server subprocess (``--rp_serve_api``: the SDK's job loop, which logs
with ``print``; everything the process writes is captured), at the most verbose levels
(LOG_LEVEL=DEBUG, RUNPOD_DEBUG_LEVEL=DEBUG: botocore, urllib3 and the SDK log requests and
job payloads) and at the defaults; and in-process with caplog at DEBUG.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import pytest
from worker_helpers import ROOT, ApiServer, b64, input_bytes, run_in_process, worker_env

from devtools.servers import AcceptPut, LocalHTTPServer, LocalS3Server, Status

CALLER_ID = "AKIACALLERCALLER0001"
CALLER_SECRET = "caller-secret-9876543210-zyxwvutsrqponm"
OTHER_SECRET = "never-registered-secret-7f3a9c1e5b"  # only ever sent in a malformed s3Config
API_KEY = "rpa_TESTKEY0123456789ABCDEFGHIJKLMNOP"
SIGNATURE_403 = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"


@dataclass
class Plan:
    """The jobs to run and every secret value they carry."""

    jobs: list[tuple[str, dict[str, Any], str]]  # (name, job, expected status or error code)
    secrets: set[str] = field(default_factory=set)

    def add_url(self, url: str) -> str:
        """Register a presigned URL's secret parts (signature, credential, the whole query)."""
        query = urlsplit(url).query
        self.secrets.add(query)
        for name, value in parse_qsl(query):
            if name in ("X-Amz-Signature", "Signature", "X-Amz-Credential", "AWSAccessKeyId"):
                self.secrets.update({value, quote(value, safe="")})
        return url


def make_plan(s3_server: LocalS3Server, http: LocalHTTPServer, seconds: float = 1.0, *,
              s3_config_jobs: bool = True) -> Plan:
    plan = Plan([])
    plan.secrets.update({CALLER_ID, CALLER_SECRET, OTHER_SECRET, SIGNATURE_403,
                         LocalS3Server.secret_access_key, LocalS3Server.access_key_id})
    data, _ = input_bytes(seconds)
    in_bucket, caller_bucket = s3_server.create_bucket(), s3_server.create_bucket()
    client = s3_server.client()
    client.put_object(Bucket=in_bucket, Key="in/song.wav", Body=data)
    v4 = s3_server.client(signature_version="s3v4")
    get = {"Bucket": in_bucket, "Key": "in/song.wav"}
    url_v4 = plan.add_url(v4.generate_presigned_url("get_object", Params=get, ExpiresIn=600))
    url_v2 = plan.add_url(client.generate_presigned_url("get_object", Params=get, ExpiresIn=600))
    put = plan.add_url(v4.generate_presigned_url(
        "put_object", Params={"Bucket": caller_bucket, "Key": "out/instrumental.mp3"},
        ExpiresIn=600))
    s3_config = {"accessId": CALLER_ID, "accessSecret": CALLER_SECRET,
                 "bucketName": caller_bucket, "endpointUrl": s3_server.endpoint_url}
    # An S3-style 403 that echoes the request's signature and credential, as AWS does.
    denied = http.route("/private/song.wav", Status(403, (
        "<?xml version='1.0' encoding='UTF-8'?><Error><Code>SignatureDoesNotMatch</Code>"
        "<Message>The request signature we calculated does not match the signature you "
        f"provided.</Message><AWSAccessKeyId>{CALLER_ID}</AWSAccessKeyId><StringToSign>"
        f"AWS4-HMAC-SHA256 {SIGNATURE_403}</StringToSign><SignatureProvided>{SIGNATURE_403}"
        "</SignatureProvided></Error>").encode(), {"Content-Type": "application/xml"}))
    denied = plan.add_url(f"{denied}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential="
                          f"{CALLER_ID}%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
                          f"&X-Amz-Signature={SIGNATURE_403}")
    put_denied = plan.add_url(http.route("/put-denied", Status(403)) +
                              f"?X-Amz-Signature={SIGNATURE_403}&X-Amz-Credential={CALLER_ID}")
    plan.jobs = [
        ("presigned-v4-in/s3Config-out", {"input": {"audio_url": url_v4},
                                          "s3Config": s3_config}, "completed"),
        ("presigned-v2-in/put-out", {"input": {"audio_url": url_v2, "output_urls": [put]}},
         "completed"),
        ("s3-uri-in/env-bucket-out", {"input": {"s3_uri": f"s3://{in_bucket}/in/song.wav"}},
         "completed"),
        ("403-presigned-in", {"input": {"audio_url": denied, "return_base64": True}},
         "DOWNLOAD_FAILED"),
        ("403-presigned-put", {"input": {"audio_url": url_v4, "output_urls": [put_denied]}},
         "UPLOAD_FAILED"),
        ("s3Config-no-bucket", {"input": {"audio_url": url_v4}, "s3Config": {
            **s3_config, "bucketName": "no-such-bucket-anywhere"}}, "UPLOAD_FAILED"),
        ("s3Config-secret-wrong-type", {"input": {"audio_url": url_v4}, "s3Config": {
            **s3_config, "accessSecret": [OTHER_SECRET]}}, "INVALID_INPUT"),
        ("s3Config-endpoint-down", {"input": {"audio_url": url_v4}, "s3Config": {
            **s3_config, "endpointUrl": "http://127.0.0.1:9/"}}, "UPLOAD_FAILED"),
    ]
    if not s3_config_jobs:
        plan.jobs = [j for j in plan.jobs if "s3Config" not in j[1]]
    return plan


def result_urls(output: list[dict]) -> list[str]:
    final = output[-1]
    return [o["url"] for o in final.get("outputs", []) if o.get("key")]


def check_output(name: str, output: list[dict], expected: str, plan: Plan) -> list[str]:
    """The job ended as expected; nothing secret in its output but its own result URLs.
    Returns those result URLs (their signatures are secrets for the logs)."""
    final = output[-1]
    if expected == "completed":
        assert final.get("status") == "completed", (name, final)
    else:
        assert set(final) == {"error"} and final["error"].startswith(f"{expected}: "), (
            name, final)
    own = result_urls(output)
    text = json.dumps(output)
    for url in own:  # the worker's own presigned GETs: the caller needs them
        text = text.replace(json.dumps(url)[1:-1], "")
    leaked = sorted(s for s in plan.secrets if s in text)
    assert not leaked, (name, leaked, text[:2000])
    assert "X-Amz-Signature" not in text and "Signature=" not in text, (name, text[:2000])
    return own


def signatures(urls: list[str]) -> set[str]:
    found = set()
    for url in urls:
        for name, value in parse_qsl(urlsplit(url).query):
            if name in ("X-Amz-Signature", "Signature"):
                found.update({value, quote(value, safe="")})
    return found


def assert_no_secret(text: str, secrets: set[str], where: str) -> None:
    leaked = sorted(s for s in secrets if s and s in text)
    assert not leaked, f"{where} leaked {leaked}"
    for m in re.finditer(r"(X-Amz-Signature|Signature|X-Amz-Credential|AWSAccessKeyId)=", text):
        assert text.startswith("<redacted>", m.end()), (where, text[m.start() - 200:m.end() + 80])


# --- through the SDK's API server -------------------------------------------------------


@pytest.mark.parametrize("levels", [("DEBUG", "DEBUG"), ("INFO", "INFO")], ids=["debug", "info"])
def test_api_server_never_prints_secrets(levels, s3_server, http_server, tmp_path):
    log_level, sdk_level = levels
    # The SDK's local API server passes only "input" to the handler (its request model has no
    # s3Config), so s3Config jobs go through the deployed job loop below instead.
    plan = make_plan(s3_server, http_server, seconds=0.5, s3_config_jobs=False)
    out_bucket = s3_server.create_bucket()
    env = worker_env(
        LOG_LEVEL=log_level, RUNPOD_DEBUG_LEVEL=sdk_level, WORK_DIR=str(tmp_path / "work"),
        MODELS_DIR=str(tmp_path / "models"), ALLOW_PRIVATE_URLS="1", RETRY_BACKOFF_S="0.01",
        S3_MAX_ATTEMPTS="2", **s3_server.bucket_env(out_bucket))
    server = ApiServer(env, tmp_path / "server.log")
    own: list[str] = []
    try:
        server.start()
        for name, job, expected in plan.jobs:
            body = server.post("/runsync", job)
            assert body["status"] == "COMPLETED", (name, body)
            own += check_output(name, body["output"], expected, plan)
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text(errors="replace")

    assert own, "no job returned a result URL of the worker's own"
    assert_no_secret(log, plan.secrets | signatures(own), f"server output at {levels}")
    # The levels took effect (so there was something to leak): the SDK's DEBUG prints every
    # job; botocore's DEBUG logs each signed request; WARNING still shows the failures.
    if sdk_level == "DEBUG":
        assert "DEBUG" in log and "<redacted>" in log, log[-3000:]
    if log_level == "DEBUG":
        assert "botocore" in log and "Signature" in log, log[-3000:]
    if log_level in ("DEBUG", "INFO", "WARNING"):
        assert "upload attempt 1/4 failed: HTTP 403" not in log  # 403 is not retried
        assert "job " not in log or "failed unexpectedly" not in log, log[-3000:]


# --- through the SDK's deployed job loop (a local stand-in for RunPod's job queue) ----------


class FakeQueue:
    """RunPod's worker-facing API on 127.0.0.1, as the SDK's deployed loop uses it: job-take
    hands out the queued jobs (whole job objects, s3Config included), job-stream and job-done
    collect what the worker posts back, ping and job-stop answer idly."""

    def __init__(self, jobs: list[dict]) -> None:
        self.jobs = list(jobs)
        self.done: dict[str, dict] = {}
        self.streamed: dict[str, list[dict]] = {}
        self.stop = threading.Event()
        queue = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: bytes = b"") -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = urlsplit(self.path).path
                if path.startswith("/job-take/") and queue.jobs:
                    self._reply(200, json.dumps(queue.jobs.pop(0)).encode())
                elif path.startswith(("/job-take/", "/job-stop/")):
                    queue.stop.wait(0.3)  # a short long-poll: no job, no stop signal
                    self._reply(204)
                else:
                    self._reply(200, b"{}")

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                path = urlsplit(self.path).path
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                job_id = path.rstrip("/").rsplit("/", 1)[-1]
                if path.startswith("/job-done/"):
                    queue.done[job_id] = body
                elif path.startswith("/job-stream/"):
                    queue.streamed.setdefault(job_id, []).append(body)
                self._reply(200, b"{}")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def env(self) -> dict[str, str]:
        q = "?gpu=none"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.base}/job-take/$ID{q}",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.base}/job-done/$RUNPOD_POD_ID/$ID{q}",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{self.base}/job-stream/$RUNPOD_POD_ID/$ID{q}",
            "RUNPOD_WEBHOOK_PING": f"{self.base}/ping/$RUNPOD_POD_ID{q}",
            "RUNPOD_POD_ID": "worker-test-1",
            "RUNPOD_AI_API_KEY": API_KEY,
        }

    def __enter__(self) -> FakeQueue:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def test_deployed_job_loop_never_prints_secrets(s3_server, http_server, tmp_path):
    """The worker as deployed (RUNPOD_WEBHOOK_GET_JOB set): the SDK fetches whole jobs,
    s3Config included, and at its DEBUG level prints every item the handler yields."""
    plan = make_plan(s3_server, http_server, seconds=0.5)
    plan.secrets.add(API_KEY)
    out_bucket = s3_server.create_bucket()
    jobs = [{"id": f"job-{i}", **job} for i, (_, job, _) in enumerate(plan.jobs)]
    log_path = tmp_path / "worker.log"
    with FakeQueue(jobs) as queue:
        env = worker_env(
            **queue.env(), LOG_LEVEL="DEBUG", RUNPOD_DEBUG_LEVEL="DEBUG",
            WORK_DIR=str(tmp_path / "work"), MODELS_DIR=str(tmp_path / "models"),
            ALLOW_PRIVATE_URLS="1", RETRY_BACKOFF_S="0.01", S3_MAX_ATTEMPTS="2",
            **s3_server.bucket_env(out_bucket))
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "handler" / "handler.py")],
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while len(queue.done) < len(jobs) and proc.poll() is None:
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(10)
    text = log_path.read_text(errors="replace")
    assert len(queue.done) == len(jobs), text[-3000:]

    own: list[str] = []
    for (name, _, expected), job in zip(plan.jobs, jobs, strict=True):
        done = queue.done[job["id"]]
        streamed = [item["output"] for item in queue.streamed.get(job["id"], [])]
        if "output" in done:  # the aggregate: every item, as streamed
            output = done["output"]
            assert streamed == output, name
        else:  # an error item ends the stream and is the job's result
            output = [*streamed, done]
        own += check_output(name, output, expected, plan)
    assert any(o.startswith(f"{s3_server.endpoint_url}/") for o in own)
    # The caller's bucket got the s3Config job's output (so s3Config really reached us).
    caller_bucket = plan.jobs[0][1]["s3Config"]["bucketName"]
    listing = s3_server.client().list_objects_v2(Bucket=caller_bucket)
    assert {o["Key"] for o in listing["Contents"]} == {
        "separations/job-0/instrumental.mp3", "out/instrumental.mp3"}  # s3Config, output_urls
    assert_no_secret(text, plan.secrets | signatures(own), "deployed worker output")
    # The levels took effect: the SDK printed every item (result URLs included, scrubbed),
    # botocore logged its signing.
    assert "Generator output: {'status': 'completed'" in text, text[-3000:]
    assert "botocore.auth" in text and "Signature:\n<redacted>" in text, text[-3000:]


# --- in-process, with caplog -------------------------------------------------------------


@pytest.fixture
def redaction_installed(caplog: pytest.LogCaptureFixture):
    """What handler.main() does after configuring logging: the redacting filter on every
    root handler (caplog's included)."""
    from handler.redact import RedactingFilter, install_log_redaction

    caplog.set_level(logging.DEBUG)
    install_log_redaction()
    yield
    for h in logging.getLogger().handlers:
        for f in [f for f in h.filters if isinstance(f, RedactingFilter)]:
            h.removeFilter(f)


def test_in_process_logs_never_hold_secrets(s3_env, s3_server, http_server, caplog, capsys,
                                            redaction_installed, monkeypatch, tmp_path):
    monkeypatch.setenv("S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("WORK_DIR", str(tmp_path / "work"))
    plan = make_plan(s3_server, http_server)
    caplog.clear()  # from here on: the worker's jobs only
    capsys.readouterr()
    own: list[str] = []
    for name, job, expected in plan.jobs:
        run = run_in_process({"id": f"secrets-{len(own)}", **job})
        own += check_output(name, [*run.progress, run.final], expected, plan)
    secrets = plan.secrets | signatures(own)

    captured = capsys.readouterr()
    assert_no_secret(captured.out + captured.err, secrets, "stdout/stderr")
    # Every record but the test's own S3 server's (moto runs in this process), formatted
    # as a handler formats it, tracebacks included.
    worker = [r for r in caplog.records if not r.name.startswith(("werkzeug", "moto"))]
    text = "\n".join(caplog.handler.format(r) for r in worker)
    assert_no_secret(text, secrets, "logs")
    assert any(r.name.startswith("botocore") and r.levelno == logging.DEBUG
               for r in caplog.records), "botocore's DEBUG logs were not captured"
    # The worker's own messages are clean by construction, not only once filtered.
    for record in caplog.records:
        if record.name.startswith("handler"):
            assert_no_secret(record.getMessage(), secrets, f"{record.name} record")


def test_error_messages_never_echo_secrets(s3_env, http_server, tmp_path, monkeypatch):
    """The failure messages alone (a caller sees these), each a real failure."""
    monkeypatch.setenv("WORK_DIR", str(tmp_path / "work"))
    data, _ = input_bytes(1.0)
    sig = f"X-Amz-Signature={SIGNATURE_403}&X-Amz-Credential={CALLER_ID}%2Fx"
    url = http_server.route("/gone", Status(404)) + "?" + sig
    user = http_server.url("/song.wav").replace("http://", f"http://{CALLER_ID}:{CALLER_SECRET}@")
    cases = [
        ({"audio_url": url, "return_base64": True}, "DOWNLOAD_FAILED"),
        ({"audio_url": user + "?" + sig, "return_base64": True}, "DOWNLOAD_FAILED"),
        ({"audio_base64": b64(data), "output_urls": [
            http_server.route("/put", AcceptPut(500)) + "?" + sig]}, "UPLOAD_FAILED"),
        ({"audio_url": f"ftp://{CALLER_ID}:{CALLER_SECRET}@example.com/a.wav?{sig}",
          "return_base64": True}, "INVALID_INPUT"),
        ({"audio_url": f"http://169.254.169.254/latest/?{sig}", "return_base64": True},
         "INVALID_INPUT"),
    ]
    for job_input, code in cases:
        run = run_in_process({"id": "err", "input": job_input, "s3Config": None})
        assert run.final["error"].startswith(f"{code}: "), run.final
        for secret in (SIGNATURE_403, CALLER_ID, CALLER_SECRET):
            assert secret not in run.final["error"], run.final
    assert http_server.hits("/put") == 4  # the PUT was really tried (and retried)


def test_s3_config_secret_wrong_shapes(s3_env, tmp_path, monkeypatch):
    """s3Config validation errors name the field, never its value."""
    monkeypatch.setenv("WORK_DIR", str(tmp_path / "work"))
    data, _ = input_bytes(0.5)
    for bad in ({"accessId": CALLER_ID, "accessSecret": {"v": CALLER_SECRET}},
                {"accessId": [CALLER_ID], "accessSecret": CALLER_SECRET},
                {"accessId": CALLER_ID, "accessSecret": CALLER_SECRET, "bucketName": 5},
                {"accessId": CALLER_ID, "accessSecret": CALLER_SECRET,
                 "endpointUrl": f"ftp://{CALLER_ID}:{CALLER_SECRET}@h/b"}):
        run = run_in_process({"id": "cfg", "input": {"audio_base64": b64(data)},
                              "s3Config": bad})
        assert run.final["error"].startswith("INVALID_INPUT: "), run.final
        assert CALLER_SECRET not in run.final["error"] and CALLER_ID not in run.final["error"]
