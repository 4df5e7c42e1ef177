"""The predecessors' documented curl commands, run verbatim with real curl against the HTTP
service (only their placeholders filled in: host and port, the data URI's "...", the example
URLs, ``{job_id}``). The commands are copied from ../shared/predecessors/*-README.md."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import Client, ThreadServer, WebhookReceiver, running_server, server_test_env
from worker_helpers import check_audio, fetch, input_bytes, write_input

from devtools.servers import LocalHTTPServer, Serve

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")

SECONDS = 0.5
SAMPLES = int(SECONDS * 44100)

# --- the CPU service's README (Akash, port 8002) -----------------------------------------------
CPU_HEALTH = "curl http://localhost:8002/health"
CPU_SYNC = """curl -X POST "http://localhost:8002/separate-sync" \\
  -H "Content-Type: application/json" \\
  -d '{
    "audio_base64": "data:audio/mpeg;base64,...",
    "model": "mdx_q",
    "output_format": "mp3"
  }'"""
CPU_ASYNC = """curl -X POST "http://localhost:8002/separate-async" \\
  -F "job_id=job_123" \\
  -F "audio_url=https://example.com/audio.mp3" \\
  -F "webhook_url=https://your-app.com/webhook" \\
  -F "model=mdx_q\""""

# --- the GPU template's README (Vast.ai, port 8185) --------------------------------------------
GPU_HEALTH = "curl http://localhost:8185/health"
GPU_STATUS = "curl http://localhost:8185/status"
GPU_JOB = """curl -X POST http://localhost:8185/job \\
  -H "Content-Type: application/json" \\
  -d '{"input_url": "https://example.com/audio.mp3"}'"""
GPU_JOB_CUTS = """curl -X POST http://localhost:8185/job \\
  -H "Content-Type: application/json" \\
  -d '{"input_url": "https://...", "interval_cut": "300,600,900"}'"""
GPU_PROGRESS = "curl http://localhost:8185/job/{job_id}"
GPU_RESULT = "curl -o instrumental.mp3 http://localhost:8185/result/{job_id}"
GPU_JOBS = "curl http://localhost:8185/jobs"


@pytest.fixture(scope="module")
def env() -> Iterator[None]:
    with server_test_env():
        yield


@pytest.fixture(scope="module")
def server(env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with running_server(tmp_path_factory.mktemp("data")) as srv:
        yield srv


@pytest.fixture(scope="module")
def mp3(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("in") / "song.mp3"
    write_input(path, SECONDS, fmt="mp3")
    return path.read_bytes()


@pytest.fixture(scope="module")
def audio_url(env: None) -> Iterator[str]:
    server = LocalHTTPServer().start()
    try:
        yield server.route("/audio.mp3", Serve(input_bytes(SECONDS)[0]))
    finally:
        server.stop()


def curl(command: str, server: ThreadServer, cwd: Path, **fill: str) -> str:
    """Run a README command with its placeholders filled; returns stdout."""
    for old, new in {"http://localhost:8002": server.url, "http://localhost:8185": server.url,
                     **fill}.items():
        command = command.replace(old, new)
    done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, (command, done.stderr)
    return done.stdout


def test_cpu_service_commands(server: ThreadServer, mp3: bytes, audio_url: str,
                              tmp_path: Path) -> None:
    health = json.loads(curl(CPU_HEALTH, server, tmp_path))
    assert health["status"] == "healthy"
    assert {"model", "hardware", "torch_version", "cuda_available", "device"} <= set(health)
    assert health["hardware"] == "CPU" and health["cuda_available"] is False

    data_uri = "data:audio/mpeg;base64," + base64.b64encode(mp3).decode()
    answer = json.loads(curl(CPU_SYNC, server, tmp_path,
                             **{"data:audio/mpeg;base64,...": data_uri}))
    assert answer["status"] == "completed", answer
    assert answer["model"] == "spleeter_2stems"  # mdx_q is not baked here: the default ran
    assert "mdx_q" in answer["warnings"][0]
    assert answer["output_format"] == "mp3"
    out = answer["outputs"]["instrumental"]
    assert out.startswith("data:audio/mpeg;base64,")
    got = fetch(out)
    check_audio(got, {"format": "mp3", "sample_rate": 44100, "channels": 1,
                      "duration_s": round(SAMPLES / 44100, 6), "bytes": len(got)},
                samples=SAMPLES, channels=1)

    with WebhookReceiver(200) as hook:
        answer = json.loads(curl(CPU_ASYNC, server, tmp_path, **{
            "https://example.com/audio.mp3": audio_url, "https://your-app.com/webhook": hook.url}))
        assert answer["job_id"] == "job_123" and answer["created"] is True
        # The same job_id again is the same job (idempotent), not a second run.
        again = json.loads(curl(CPU_ASYNC, server, tmp_path, **{
            "https://example.com/audio.mp3": audio_url, "https://your-app.com/webhook": hook.url}))
        assert again["job_id"] == "job_123" and again["created"] is False
        delivery = hook.wait_for(1, timeout_s=60)[0].json()
    assert delivery["job_id"] == "job_123" and delivery["status"] == "completed"
    assert delivery["state"] == "COMPLETED" and delivery["id"] == "job_123"
    url = delivery["outputs"]["instrumental"]
    assert url.startswith(server.url + "/result/job_123/instrumental?sig=")
    got = fetch(url)
    assert len(got) > 1000 and got == fetch(delivery["output"][-1]["audio_url"])

    root = json.loads(curl("curl http://localhost:8002/", server, tmp_path))
    assert root["service"] == "separation-worker" and "/separate-sync" in root["routes"]


def test_gpu_template_commands(server: ThreadServer, audio_url: str, tmp_path: Path) -> None:
    health = json.loads(curl(GPU_HEALTH, server, tmp_path))
    assert health["status"] == "healthy" and health["models_ready"] is True
    status = json.loads(curl(GPU_STATUS, server, tmp_path))
    assert status["models_ready"] is True and "active_jobs" in status

    client = Client(server.url)
    made = json.loads(curl(GPU_JOB, server, tmp_path,
                           **{"https://example.com/audio.mp3": audio_url}))
    job_id = made["job_id"]
    assert made["state"] in {"idle", "demucs"}
    cuts = json.loads(curl(GPU_JOB_CUTS, server, tmp_path, **{"https://...": audio_url}))
    client.wait(job_id)
    client.wait(cuts["job_id"])

    progress = json.loads(curl(GPU_PROGRESS, server, tmp_path, **{"{job_id}": job_id}))
    assert progress["state"] == "completed"
    assert progress["tasks"] == dict.fromkeys(("models", "cutting", "inference",
                                               "conversion"), "done")
    assert {"timestamp", "elapsed_seconds"} <= set(progress)
    details = progress["details"]
    assert details["models_ready"] is True and details["percent"] == 100.0
    assert details["completed_segments"] == details["total_segments"] >= 1

    # The instrumental's bytes, not a redirect (curl -o without -L).
    curl(GPU_RESULT, server, tmp_path, **{"{job_id}": job_id})
    data = (tmp_path / "instrumental.mp3").read_bytes()
    check_audio(data, {"format": "mp3", "sample_rate": 44100, "channels": 1,
                       "duration_s": round(SAMPLES / 44100, 6), "bytes": len(data)},
                samples=SAMPLES, channels=1)
    # With interval_cut: the first interval's file.
    (tmp_path / "instrumental.mp3").unlink()
    curl(GPU_RESULT, server, tmp_path, **{"{job_id}": cuts["job_id"]})
    cut = (tmp_path / "instrumental.mp3").read_bytes()
    check_audio(cut, {"format": "mp3", "sample_rate": 44100, "channels": 1,
                      "duration_s": round(SAMPLES / 44100, 6), "bytes": len(cut)},
                samples=SAMPLES, channels=1)
    cut_status = client.status(cuts["job_id"])
    assert cut_status["output"][-1]["outputs"][0]["interval"] == 0

    listed = json.loads(curl(GPU_JOBS, server, tmp_path))
    by_id = {j["job_id"]: j for j in listed["jobs"]}
    assert by_id[job_id]["state"] == "completed" and by_id[cuts["job_id"]]["percent"] == 100.0
    batch = client.get(f"/jobs?ids={job_id},{cuts['job_id']}").json()
    assert {j["job_id"] for j in batch["jobs"]} == {job_id, cuts["job_id"]}
    # Range requests on a result (players seek with them).
    url = client.status(job_id)["output"][-1]["audio_url"]
    part = client.get(url.removeprefix(server.url), headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
