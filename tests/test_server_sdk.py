"""The HTTP service's RunPod job API, driven by the unmodified runpod SDK (1.12) and by plain
requests, over real HTTP on 127.0.0.1 (server in a thread of this process, model shared)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from server_helpers import (
    Client,
    ThreadServer,
    audio_server,
    running_server,
    server_test_env,
    short_input,
)
from worker_helpers import check_audio, check_final, check_progress, fetch

SHORT_S = 0.5
SHORT_SAMPLES = int(SHORT_S * 44100)


@pytest.fixture(scope="module")
def env() -> Iterator[None]:
    with server_test_env():
        yield


@pytest.fixture(scope="module")
def audio(env: None) -> Iterator[dict[str, str]]:
    """URLs of a short clip and of a long one (120 s: ten chunks, for cancel/timeout)."""
    with audio_server(SHORT_S, 120.0) as urls:
        yield urls


@pytest.fixture(scope="module")
def server(env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with running_server(tmp_path_factory.mktemp("data")) as srv:
        yield srv


@pytest.fixture
def endpoint(server: ThreadServer) -> Iterator[object]:
    """``runpod.Endpoint`` pointed at the server exactly as the issue documents it."""
    import runpod

    saved = runpod.endpoint_url_base, runpod.api_key
    runpod.endpoint_url_base = f"{server.url}/v2"
    runpod.api_key = "unused-without-API_TOKEN"
    try:
        yield runpod.Endpoint("any-endpoint-id")
    finally:
        runpod.endpoint_url_base, runpod.api_key = saved


@pytest.fixture
def client(server: ThreadServer) -> Client:
    return server.client()


def idle(server: ThreadServer, client: Client) -> None:
    """Wait until the runner is free (a cancelled job's thread has ended)."""
    import time

    deadline = time.monotonic() + 60
    while client.get("/health").json()["workers"]["running"]:
        assert time.monotonic() < deadline, "the runner stayed busy"
        time.sleep(0.05)


def check_output(output: list) -> dict:
    """RunPod's aggregate stream: progress items, then the result, which is downloadable."""
    assert isinstance(output, list) and output, output
    check_progress(output[:-1])
    final = output[-1]
    check_final(final, n_outputs=1)
    out = final["outputs"][0]
    check_audio(fetch(out["url"]), out, samples=SHORT_SAMPLES, channels=1)
    return final


def test_sdk_run_status_output(endpoint: object) -> None:
    job = endpoint.run({"audio_base64": short_input(SHORT_S)["audio_base64"]})
    assert job.status() in {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    output = job.output(timeout=120)
    assert job.status() == "COMPLETED"
    check_output(output)


def test_sdk_stream(endpoint: object) -> None:
    job = endpoint.run({"input": short_input(SHORT_S)})
    items = list(job.stream())
    check_output(items)


def test_sdk_run_sync_and_health(endpoint: object) -> None:
    check_output(endpoint.run_sync({"input": short_input(SHORT_S)}, timeout=120))
    health = endpoint.health()
    assert health["jobs"]["completed"] >= 1 and health["workers"]["ready"] == 1
    assert health["status"] == "healthy"


def test_sdk_failed_job(endpoint: object, client: Client) -> None:
    job = endpoint.run({"input": {"audio_url": "ftp://example.com/a.mp3"}})
    assert job.output(timeout=60) is None
    assert job.status() == "FAILED"
    body = client.status(job.job_id)
    assert body["error"].startswith("INVALID_INPUT: "), body
    assert "output" not in body


def test_sdk_cancel_running_and_queued(endpoint: object, client: Client, audio: dict,
                                       server: ThreadServer) -> None:
    running = endpoint.run({"input": {"audio_url": audio["long"]}})
    queued = endpoint.run({"input": {"audio_url": audio["short"]}})
    client.wait_separating(running.job_id)
    assert client.status(queued.job_id)["status"] == "IN_QUEUE"
    assert queued.cancel() == {"id": queued.job_id, "status": "CANCELLED"}
    assert running.cancel() == {"id": running.job_id, "status": "CANCELLED"}
    assert running.status() == "CANCELLED"
    idle(server, client)
    # Stopped within a chunk: its last progress is mid-separation, and no result was made.
    body = client.status(running.job_id)
    assert body["status"] == "CANCELLED" and "output" not in body
    last = body["progress"]
    assert last["stage"] == "separate" and last["completed_segments"] < last["total_segments"]
    assert client.status(queued.job_id)["startedAt"] is None  # never ran
    check_output(endpoint.run_sync({"input": short_input(SHORT_S)}, timeout=120))


def test_execution_timeout(client: Client, audio: dict, server: ThreadServer) -> None:
    job_id = client.run({"audio_url": audio["long"]}, policy={"executionTimeout": 1500})
    body = client.wait(job_id)
    assert body["status"] == "TIMED_OUT", body
    assert body["error"].startswith("TIMED_OUT: "), body
    idle(server, client)


def test_prefer_wait_runsync_and_location(client: Client, audio: dict,
                                         server: ThreadServer) -> None:
    resp = client.post("/run", json={"input": short_input(SHORT_S)},
                       headers={"Prefer": "wait=60"})
    assert resp.status_code == 200 and resp.json()["status"] == "COMPLETED", resp.text
    check_output(resp.json()["output"])
    resp = client.post("/runsync?wait=60000", json={"input": short_input(SHORT_S)})
    assert resp.json()["status"] == "COMPLETED"
    # Not done within the wait: the current state and where to poll.
    resp = client.post("/run", json={"input": {"audio_url": audio["long"]}},
                       headers={"Prefer": "wait=0.3"})
    body = resp.json()
    assert body["status"] in {"IN_QUEUE", "IN_PROGRESS"}, body
    assert resp.headers["Location"] == f"/status/{body['id']}"
    client.post(f"/cancel/{body['id']}")
    idle(server, client)


def test_status_and_stream_by_get_and_post(client: Client) -> None:
    job_id = client.run(short_input(SHORT_S))
    final = client.wait(job_id)
    assert final == {**client.post(f"/status/{job_id}").json(),
                     "executionTime": final["executionTime"]}
    # /stream hands out each item once (RunPod's), GET or POST.
    first = client.get(f"/stream/{job_id}").json()
    assert first["status"] == "COMPLETED" and first["stream"]
    assert [c["output"] for c in first["stream"]] == final["output"]
    assert client.post(f"/stream/{job_id}").json()["stream"] == []
    assert client.get("/status/no-such-job").status_code == 404


def test_server_sent_events(client: Client) -> None:
    job_id = client.run(short_input(SHORT_S))
    events = []
    with requests.get(f"{client.url}/stream/{job_id}", stream=True, timeout=60,
                      headers={"Accept": "text/event-stream"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        event: dict = {}
        for line in resp.iter_lines(decode_unicode=True):
            if not line:
                if event:
                    events.append(event)
                event = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                event[key] = value
    kinds = [e["event"] for e in events]
    assert kinds[-2:] == ["output", "completed"] and set(kinds[:-2]) == {"progress"}, kinds
    check_output([json.loads(e["data"]) for e in events[:-1]])
    assert json.loads(events[-1]["data"])["status"] == "COMPLETED"


def test_retry_and_purge_queue(client: Client, audio: dict, server: ThreadServer) -> None:
    failed = client.run({"audio_url": "ftp://example.com/a.mp3"})
    assert client.wait(failed)["status"] == "FAILED"
    assert client.post(f"/retry/{failed}").json() == {"id": failed, "status": "IN_QUEUE"}
    body = client.wait(failed)
    assert body["status"] == "FAILED" and body["attempts"] == 1
    done = client.run(short_input(SHORT_S))
    client.wait(done)
    assert client.post(f"/retry/{done}").status_code == 400  # only FAILED / TIMED_OUT

    running = client.run({"audio_url": audio["long"]})
    client.wait_separating(running)
    queued = [client.run(short_input(SHORT_S)) for _ in range(2)]
    assert client.post("/purge-queue").json()["removed"] == 2
    assert {client.status(q)["status"] for q in queued} == {"CANCELLED"}
    assert client.status(running)["status"] == "IN_PROGRESS"  # running jobs continue
    client.post(f"/cancel/{running}")
    idle(server, client)


def test_remote_cli_against_the_server(server: ThreadServer, audio: dict,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``demucs-separate --endpoint http://host:port``: the CLI's remote mode."""
    from handler.adapters.remote import run_remote
    from handler.core.pipeline import SeparationRequest

    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    paths = run_remote(server.url, audio["short"], tmp_path / "out", SeparationRequest(),
                       quiet=True, poll_s=0.2)
    assert [p.name for p in paths] == ["instrumental.mp3"]
    data = paths[0].read_bytes()
    check_audio(data, {"format": "mp3", "sample_rate": 44100, "channels": 1,
                       "duration_s": round(SHORT_SAMPLES / 44100, 6), "bytes": len(data)},
                samples=SHORT_SAMPLES, channels=1)


def test_bucket_results_and_result_route(server: ThreadServer, client: Client, s3_env: str,
                                         s3_server: object) -> None:
    """With the worker's bucket configured, outputs are the worker's presigned URLs, and the
    GPU template's ``/result/{id}`` streams the bytes from the bucket (no redirect)."""
    job_id = client.run(short_input(SHORT_S))
    final = client.wait(job_id)["output"][-1]
    out = final["outputs"][0]
    assert out["bucket"] == s3_env and out["key"].endswith(f"/{job_id}/instrumental.mp3")
    assert "X-Amz-Signature=" in out["url"]
    data = fetch(out["url"])
    check_audio(data, out, samples=SHORT_SAMPLES, channels=1)
    proxied = client.get(f"/result/{job_id}", allow_redirects=False)
    assert proxied.status_code == 200 and proxied.content == data


def test_settings_env_and_predecessor_aliases(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    from handler import config
    from handler.adapters.http.settings import ServerSettings

    for name in ("EXECUTION_TIMEOUT_S", "DEFAULT_MODEL", "API_TOKEN", "API_TOKENS"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("PORT", "8185")
    monkeypatch.setenv("HOST", "127.0.0.1")
    monkeypatch.setenv("SEPARATION_TIMEOUT", "42")
    monkeypatch.setenv("DEMUCS_MODEL", "htdemucs")
    monkeypatch.setenv("API_TOKENS", "a-token-1, a-token-2")
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    settings = ServerSettings()
    assert (settings.host, settings.port, settings.execution_timeout_s) == ("127.0.0.1", 8185, 42)
    assert config.default_model() == "htdemucs"
    assert settings.tokens == ("a-token-1", "a-token-2") and settings.data_dir == tmp_path
    monkeypatch.setenv("EXECUTION_TIMEOUT_S", "7")  # the new name wins over the alias
    monkeypatch.setenv("DEFAULT_MODEL", "spleeter_2stems")
    settings = ServerSettings()
    assert settings.execution_timeout_s == 7 and config.default_model() == "spleeter_2stems"


def test_public_base_url(tmp_path: Path, env: None) -> None:
    from server_helpers import thread_server

    with thread_server(tmp_path, public_base_url="https://separate.example.com") as srv:
        c = srv.client()
        job_id = c.run(short_input(SHORT_S))
        url = c.wait(job_id)["output"][-1]["audio_url"]
        assert url.startswith(f"https://separate.example.com/result/{job_id}/instrumental?sig=")
        local = url.removeprefix("https://separate.example.com")
        assert requests.get(srv.url + local, timeout=10).status_code == 200
