"""The HTTP service's durability and limits over real HTTP on 127.0.0.1: restart after
``kill -9`` mid-job and SIGTERM drain (subprocess servers), webhook retries with Standard
Webhooks signatures, auth (401), body cap (413) and queue cap (429)."""

from __future__ import annotations

import base64
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from server_helpers import (
    TERMINAL,
    ProcServer,
    WebhookReceiver,
    audio_server,
    server_test_env,
    short_input,
    thread_server,
)
from worker_helpers import fetch

from devtools.servers import LocalS3Server


@pytest.fixture(scope="module")
def env() -> Iterator[None]:
    with server_test_env():
        yield


@pytest.fixture(scope="module")
def audio(env: None) -> Iterator[dict[str, str]]:
    with audio_server(0.5, 60.0) as urls:
        yield urls


def db_status(data: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        return {row[0]: (row[1], row[2])
                for row in db.execute("SELECT id, status, attempts FROM jobs")}


# --- restart -----------------------------------------------------------------------------------


def job_dirs(work: Path, job_id: str) -> list[Path]:
    return sorted(p for p in work.glob(f"job-{job_id}-*") if len(p.name) == len(job_id) + 13)


def test_kill9_restart_then_sigterm_drain(tmp_path: Path, audio: dict) -> None:
    """One data directory, three server processes (each start loads the model, so the
    scenarios share them):

    1. ``kill -9`` mid-job; the restart keeps finished jobs readable (same URL, same bytes),
       re-queues the interrupted job once (it completes, attempt 2) and runs the queued one.
    2. ``kill -9`` mid-job again; a start with MAX_ATTEMPTS=1 fails that job, not reruns it.
    3. SIGTERM: /readyz 503 and new jobs 503 at once, status still served, the running job
       finishes, exit 0; the queued job stays IN_QUEUE in SQLite for the next start.
    """
    data = tmp_path / "data"
    common = {"ALLOW_PRIVATE_URLS": "1", "PROGRESS_INTERVAL_S": "0.2",
              "WORK_DIR": str(tmp_path / "work"), "SHUTDOWN_GRACE_S": "120"}
    first = ProcServer(data, tmp_path / "1.log", **common).start()
    try:
        c = first.client()
        done = c.run({"audio_url": audio["short"]})
        url = c.wait(done)["output"][-1]["audio_url"]
        result = fetch(url)
        killed = c.run({"audio_url": audio["long"]})
        queued = c.run({"audio_url": audio["short"]})
        assert c.wait_separating(killed)["status"] == "IN_PROGRESS"
    finally:
        first.kill9()
    assert db_status(data)[killed] == ("IN_PROGRESS", 1)
    left = job_dirs(tmp_path / "work", killed)
    assert len(left) == 1, left  # the dead process's temp folder (its input, partial stems)
    bystander = tmp_path / "work" / f"job-{killed}x-abcd1234"  # another id's folder: kept
    bystander.mkdir()

    second = ProcServer(data, tmp_path / "2.log", port=first.port, **common).start()
    try:
        c = second.client()
        assert not left[0].exists(), "the restart left the killed job's work folder"
        assert bystander.is_dir()
        assert c.status(done)["status"] == "COMPLETED"
        assert fetch(url) == result
        body = c.wait(killed, timeout_s=120)
        assert body["status"] == "COMPLETED" and body["attempts"] == 2, body
        assert c.wait(queued)["status"] == "COMPLETED"
        again = c.run({"audio_url": audio["long"]})
        c.wait_separating(again)
    finally:
        second.kill9()
    assert "re-queued 1 interrupted job(s), failed 0; removed 1 work folder(s)" in \
        (tmp_path / "2.log").read_text()
    left = job_dirs(tmp_path / "work", again)
    assert len(left) == 1, left

    third = ProcServer(data, tmp_path / "3.log", port=first.port, MAX_ATTEMPTS="1",
                       **common).start()
    try:
        c = third.client()
        body = c.status(again)
        assert body["status"] == "FAILED" and "interrupted" in body["error"], body
        assert not left[0].exists(), "a job failed at restart kept its work folder"
        running = c.run({"audio_url": audio["long"]})
        waiting = c.run({"audio_url": audio["short"]})
        c.wait_separating(running)
        third.terminate()
        deadline = time.monotonic() + 10
        while c.get("/readyz").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get("/readyz").json()["reason"] == "draining"
        refused = c.post("/run", json={"input": short_input()})
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert c.status(running)["status"] in ("IN_PROGRESS", "COMPLETED")  # still served
        assert third.proc is not None
        assert third.proc.wait(120) == 0, third.log()
    finally:
        third.stop()
    jobs = db_status(data)
    assert jobs[running][0] == "COMPLETED"  # finished within the grace period
    assert jobs[waiting][0] == "IN_QUEUE"  # kept for the next start


# --- webhooks ---------------------------------------------------------------------------------


def test_webhook_retries_and_signature(tmp_path: Path, env: None) -> None:
    from standardwebhooks import Webhook, WebhookVerificationError

    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    with WebhookReceiver(500, 500, 200) as hook, thread_server(
            tmp_path, webhook_secret=secret, webhook_backoff_s=(0.3, 0.3, 0.3)) as srv:
        c = srv.client()
        job = c.run(short_input(), webhook=hook.url)
        got = hook.wait_for(3)
        time.sleep(1.0)
        assert len(hook.received) == 3  # delivered: no more attempts
        assert len({r.headers["webhook-id"] for r in got}) == 1
        assert got[2].at - got[0].at >= 0.4  # backoff between attempts
        verifier = Webhook(secret)
        for r in got:
            payload = verifier.verify(r.body, r.headers)
            assert payload["id"] == job and payload["status"] == "COMPLETED"
            assert payload["output"][-1]["status"] == "completed"
        with pytest.raises(WebhookVerificationError):
            verifier.verify(got[0].body.replace(b"COMPLETED", b"FAILED"), got[0].headers)
        (state,) = srv.service.store.deliveries(job)
        assert state["state"] == "delivered" and state["attempt"] == 3

    with WebhookReceiver(410) as hook, thread_server(
            tmp_path, webhook_backoff_s=(0.2, 0.2)) as srv:
        job = srv.client().run(short_input(), webhook=hook.url)
        hook.wait_for(1)
        time.sleep(0.8)
        assert len(hook.received) == 1  # 410 Gone stops
        assert "webhook-signature" not in {k.lower() for k in hook.received[0].headers}
        assert srv.service.store.deliveries(job)[0]["state"] == "gone"


def test_webhook_outbox_survives_restart(tmp_path: Path, env: None) -> None:
    with WebhookReceiver(503, 200) as hook:
        with thread_server(tmp_path, webhook_backoff_s=(1.5,)) as srv:
            job = srv.client().run(short_input(), webhook=hook.url)
            hook.wait_for(1)
        # stopped with the retry pending; the next start delivers it
        with thread_server(tmp_path, webhook_backoff_s=(1.5,)) as srv:
            got = hook.wait_for(2)
            assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"]
            assert srv.service.store.deliveries(job)[0]["state"] == "delivered"


def test_webhook_address_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               env: None) -> None:
    with thread_server(tmp_path) as srv:
        c = srv.client()
        metadata = c.post("/run", json={"input": short_input(),
                                        "webhook": "http://169.254.169.254/latest"})
        assert metadata.status_code == 400 and "webhook" in metadata.json()["detail"]
        monkeypatch.delenv("ALLOW_PRIVATE_URLS")
        loopback = c.post("/run", json={"input": short_input(),
                                        "webhook": "http://127.0.0.1:9/hook"})
        assert loopback.status_code == 400
        assert c.post("/run", json={"input": short_input(),
                                    "webhook": "ftp://example.com/x"}).status_code == 400


# --- auth and limits --------------------------------------------------------------------------


def test_auth_401(tmp_path: Path, env: None) -> None:
    import runpod

    token = "t0ken-for-tests-only"
    with thread_server(tmp_path, tokens=(token,)) as srv:
        anon, wrong, right = srv.client(), srv.client("nope"), srv.client(token)
        for c in (anon, wrong):
            resp = c.post("/run", json={"input": short_input()})
            assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
            assert c.get("/status/x").status_code == 401
            assert c.get("/jobs").status_code == 401
        bare = srv.client()
        bare.session.headers["Authorization"] = token  # RunPod's curl examples send it bare
        assert bare.get("/status/nope").status_code == 404
        for path in ("/health", "/ping", "/livez", "/readyz", "/v2/any/health", "/"):
            assert anon.get(path).status_code in (200, 204), path
        job = right.run(short_input())
        url = right.wait(job)["output"][-1]["audio_url"]
        assert requests.get(url, timeout=10).status_code == 200  # signed, like presigned
        bare_url = url.split("?")[0]
        assert requests.get(bare_url, timeout=10).status_code == 401
        assert requests.get(bare_url + "?sig=0" * 1, timeout=10).status_code == 401
        assert right.get(bare_url.removeprefix(srv.url)).status_code == 200
        saved = runpod.endpoint_url_base, runpod.api_key
        runpod.endpoint_url_base = f"{srv.url}/v2"
        try:
            with pytest.raises(RuntimeError, match="401"):
                runpod.Endpoint("e", api_key="wrong").run({"input": short_input()})
            assert runpod.Endpoint("e", api_key=token).health()["status"] == "healthy"
        finally:
            runpod.endpoint_url_base, runpod.api_key = saved


def test_body_cap_413(tmp_path: Path, env: None) -> None:
    with thread_server(tmp_path, max_upload_bytes=256 * 1024) as srv:
        c = srv.client()
        big = {"input": {"audio_base64": "A" * (300 * 1024)}}
        assert c.post("/run", json=big).status_code == 413
        assert c.post("/separate-sync", json={"audio_base64": "A" * (300 * 1024)}
                      ).status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed body is counted
            yield b'{"input": {"audio_base64": "'
            for _ in range(40):
                yield b"A" * 8192
            yield b'"}}'

        resp = c.post("/run", data=chunks(), headers={"Content-Type": "application/json"})
        assert resp.status_code == 413
        assert c.post("/run", json={"input": short_input()}).status_code == 200


def test_queue_cap_429_and_ttl(tmp_path: Path, audio: dict) -> None:
    with thread_server(tmp_path, max_queue=1, janitor_interval_s=0.2) as srv:
        c = srv.client()
        running = c.run({"audio_url": audio["long"]})
        c.wait(running, lambda j: j["status"] != "IN_QUEUE")
        queued = c.run({"audio_url": audio["short"]}, policy={"ttl": 1000})
        full = c.post("/run", json={"input": {"audio_url": audio["short"]}})
        assert full.status_code == 429, full.text
        assert int(full.headers["Retry-After"]) >= 1
        # The queued job's ttl runs out before it starts: the janitor times it out.
        body = c.wait(queued, timeout_s=10)
        assert body["status"] == "TIMED_OUT" and "ttl" in body["error"], body
        assert body["startedAt"] is None
        again = c.run({"audio_url": audio["short"]})  # room in the queue again
        assert c.post(f"/cancel/{again}").json()["status"] == "CANCELLED"
        assert c.post(f"/cancel/{running}").json()["status"] == "CANCELLED"
        assert c.wait(running)["status"] in TERMINAL


def test_retention_janitor(tmp_path: Path, env: None) -> None:
    with thread_server(tmp_path, result_retention_s=1.0, janitor_interval_s=0.2) as srv:
        c = srv.client()
        job = c.run(short_input())
        url = c.wait(job)["output"][-1]["audio_url"]
        assert requests.get(url, timeout=10).status_code == 200
        assert (tmp_path / "results" / job).is_dir()
        deadline = time.monotonic() + 15
        while c.get(f"/status/{job}").status_code != 404:
            assert time.monotonic() < deadline, "the janitor kept an expired job"
            time.sleep(0.1)
        assert requests.get(url, timeout=10).status_code == 404
        assert not (tmp_path / "results" / job).exists()


def test_s3config_credentials_leave_the_database_when_the_job_completes(
        tmp_path: Path, env: None, s3_server: LocalS3Server) -> None:
    """A job with RunPod's s3Config: the stems land in the bucket; afterwards neither the
    SQLite file nor its WAL holds the credentials, and both are owner-only."""
    bucket = s3_server.create_bucket()
    secret = "s3cfg-secret-" + os.urandom(8).hex()
    s3_config = {"accessId": "AKIASRVTEST0001", "accessSecret": secret, "bucketName": bucket,
                 "endpointUrl": s3_server.endpoint_url}
    with thread_server(tmp_path) as srv:
        c = srv.client()
        job = c.run(short_input(), s3Config=s3_config)
        body = c.wait(job)
        assert body["status"] == "COMPLETED", body
        key = body["output"][-1]["outputs"][0]["key"]
        assert s3_server.client().head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
        files = sorted(tmp_path.glob("jobs.sqlite3*"))
        assert {f.name for f in files} >= {"jobs.sqlite3", "jobs.sqlite3-wal"}, files
        for f in files:
            assert f.stat().st_mode & 0o077 == 0, (f, oct(f.stat().st_mode))
        # The WAL still holds the page as first written: checkpoint and truncate it, as
        # SQLite does on its own once the WAL grows, then nothing may be left anywhere.
        with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for f in sorted(tmp_path.glob("jobs.sqlite3*")):
            assert secret.encode() not in f.read_bytes(), f"{f.name} holds the secret"
