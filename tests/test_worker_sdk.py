"""The worker through the runpod SDK's own machinery, in subprocesses.

* ``handler.py --rp_serve_api``: the SDK's FastAPI server runs our generator handler in its
  real job loop (``run_job_generator``); ``/runsync``, ``/run`` + ``/status`` or ``/stream``.
* ``handler.py --test_input`` / ``test_input.json``: our local runner (the SDK's own would
  never iterate a generator, and would exit 0 on failure).
* remote mode (``handler/remote.py``, ``demucs-separate --endpoint``) against the API server.

Storage is moto over HTTP; the model is the real spleeter_2stems.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from worker_helpers import (
    ROOT,
    ApiServer,
    b64,
    check_audio,
    check_final,
    check_progress,
    decode,
    fetch,
    input_bytes,
    split_output,
    worker_env,
    write_input,
)


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.create_bucket()


@pytest.fixture(scope="module")
def server_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api")
    dirs = {"work": root / "work", "models": root / "models"}
    for d in dirs.values():
        d.mkdir()
    return dirs


def bucket_env(s3_server, bucket: str) -> dict[str, str]:
    return {
        **s3_server.bucket_env(bucket),
        "ALLOW_PRIVATE_URLS": "1",
        "RETRY_BACKOFF_S": "0.01",
    }


@pytest.fixture(scope="module")
def api(s3_server, bucket, server_dirs, tmp_path_factory):
    """One API server process for the module (starting it loads the model: ~10 s)."""
    env = worker_env(**bucket_env(s3_server, bucket), WORK_DIR=str(server_dirs["work"]),
                     MODELS_DIR=str(server_dirs["models"]))
    server = ApiServer(env, tmp_path_factory.mktemp("api-log") / "server.log")
    try:
        yield server.start()
    finally:
        server.stop()
    assert server.proc is not None and server.proc.poll() is not None, "server still running"


def upload(s3_server, bucket: str, key: str, tmp_path: Path, seconds: float = 2.0) -> int:
    path = tmp_path / "input.wav"
    samples = write_input(path, seconds)
    s3_server.client().upload_file(str(path), bucket, key)
    return samples


def assert_work_dir_empty(server_dirs) -> None:
    left = list(server_dirs["work"].iterdir())
    assert not left, f"the server left temp files: {left}"


# --- the SDK's API server -----------------------------------------------------------------


def test_runsync_streams_progress_then_result(api, s3_server, bucket, tmp_path, server_dirs):
    samples = upload(s3_server, bucket, "sdk/in.wav", tmp_path)

    output = api.runsync({"s3_uri": f"s3://{bucket}/sdk/in.wav", "channels": 2})

    progress, final = split_output(output)
    check_progress(progress)
    check_final(final, n_outputs=1)
    out = final["outputs"][0]
    assert out["key"].startswith("separations/test-") and out["key"].endswith("/instrumental.mp3")
    check_audio(fetch(out["url"]), out, samples=samples, channels=2)
    assert_work_dir_empty(server_dirs)


def test_run_then_status(api, server_dirs):
    data, samples = input_bytes(2.0)
    submitted = api.post("/run", {"input": {"audio_base64": b64(data), "return_base64": True,
                                            "stems": ["instrumental", "vocals"],
                                            "output_format": "wav"}})
    assert submitted["status"] == "IN_PROGRESS" and submitted["id"]

    status = api.post(f"/status/{submitted['id']}")

    assert status["status"] == "COMPLETED", status
    progress, final = split_output(status["output"])
    check_progress(progress)
    check_final(final, n_outputs=2)
    for out in final["outputs"]:
        check_audio(fetch(out["url"]), out, samples=samples, channels=1)
    assert_work_dir_empty(server_dirs)


def test_run_then_stream(api):
    data, samples = input_bytes(2.0)
    submitted = api.post("/run", {"input": {"audio_base64": b64(data), "return_base64": True}})

    streamed = api.post(f"/stream/{submitted['id']}")

    assert streamed["status"] == "COMPLETED", streamed
    items = [chunk["output"] for chunk in streamed["stream"]]
    progress, final = split_output(items)
    check_progress(progress)
    check_final(final, n_outputs=1)
    check_audio(fetch(final["audio_url"]), final["outputs"][0], samples=samples, channels=1)


def test_failing_jobs_then_a_good_one_on_the_same_server(api, bucket, server_dirs):
    noise = b64(bytes(range(256)) * 64)
    failing = [
        ({"audio_url": "https://example.com/a.mp3", "return_base64": True, "extra": 1},
         "INVALID_INPUT"),
        ({"s3_uri": f"s3://{bucket}/sdk/missing.wav", "return_base64": True},
         "DOWNLOAD_FAILED"),
        ({"audio_base64": noise, "return_base64": True}, "UNSUPPORTED_AUDIO"),
        ({"audio_base64": noise, "return_base64": True, "model": "htdemucs"},
         "MODEL_UNAVAILABLE"),  # MODELS_DIR is empty in this server
    ]
    for job_input, code in failing:
        body = api.post("/runsync", {"input": job_input})
        progress, final = split_output(body["output"])
        assert set(final) == {"error"} and final["error"].startswith(f"{code}: "), body
        assert all("error" not in item for item in progress), body
        assert_work_dir_empty(server_dirs)

    data, samples = input_bytes(2.0)
    _, final = split_output(api.runsync({"audio_base64": b64(data), "return_base64": True}))
    check_final(final, n_outputs=1)
    check_audio(fetch(final["audio_url"]), final["outputs"][0], samples=samples, channels=1)


# --- local runs: --test_input and test_input.json -----------------------------------------


def run_handler(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "handler" / "handler.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=180,
    )


def test_test_input_success(s3_server, bucket, tmp_path):
    samples = upload(s3_server, bucket, "local/in.wav", tmp_path)
    job = {"id": "local-1", "input": {"s3_uri": f"s3://{bucket}/local/in.wav"}}

    proc = run_handler(["--test_input", json.dumps(job)],
                       worker_env(**bucket_env(s3_server, bucket)), tmp_path)

    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout)  # stdout is the result alone; progress went to stderr
    check_final(final, n_outputs=1)
    assert final["outputs"][0]["key"] == "separations/local-1/instrumental.mp3"
    check_audio(fetch(final["audio_url"]), final["outputs"][0], samples=samples, channels=1)
    assert "[separate]" in proc.stderr


def test_test_input_failure_exits_1(tmp_path):
    job = {"input": {"audio_url": "https://example.com/a.mp3", "model": "nope",
                     "return_base64": True}}

    proc = run_handler(["--test_input", json.dumps(job)], worker_env(), tmp_path)

    assert proc.returncode == 1, (proc.stdout, proc.stderr[-3000:])
    result = json.loads(proc.stdout)
    assert set(result) == {"error"}
    assert result["error"].startswith("INVALID_INPUT: unknown model 'nope'")


def test_test_input_json_in_working_directory(s3_server, bucket, tmp_path):
    samples = upload(s3_server, bucket, "local/json.wav", tmp_path)
    url = s3_server.client().generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "local/json.wav"}, ExpiresIn=600)
    (tmp_path / "test_input.json").write_text(json.dumps(
        {"input": {"audio_url": url, "return_base64": True, "output_format": "flac"}}))

    proc = run_handler([], worker_env(ALLOW_PRIVATE_URLS="1"), tmp_path)

    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout)
    check_final(final, n_outputs=1)
    out = final["outputs"][0]
    assert out["url"].startswith("data:audio/flac;base64,")
    check_audio(fetch(out["url"]), out, samples=samples, channels=1)


# --- remote mode (handler/remote.py) ------------------------------------------------------


def test_remote_mode_end_to_end_against_the_api_server(api, s3_server, bucket, monkeypatch,
                                                       tmp_path, capsys):
    """``demucs-separate --endpoint`` against the SDK's real API server: the local file goes
    to the bucket, the job is submitted with the SDK's RunPodClient, polled (the local server
    answers POST where the hosted API wants GET: the client switches on the 405), and the
    outputs come back into the output folder."""
    import runpod

    from handler.adapters import cli

    for name, value in bucket_env(s3_server, bucket).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RUNPOD_API_KEY", "local-test-key")
    # The SDK builds f"{endpoint_url_base}/{endpoint_id}/run"; urllib3 removes the dot
    # segment, so endpoint id ".." reaches the local server's /run, /stream and /status.
    monkeypatch.setattr(runpod, "endpoint_url_base", api.url + "/v2")
    song = tmp_path / "my song.wav"
    samples = write_input(song, 2.0)
    before = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)
              .get("Contents", [])}

    code = cli.main(["--input", str(song), "--output", str(tmp_path / "out"), "--endpoint", "..",
                     "--stems", "vocals,instrumental", "--format", "flac", "--interval-cut", "1"])

    assert code == 0, capsys.readouterr().err
    paths = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in paths] == ["instrumental_000.flac", "instrumental_001.flac",
                                       "vocals_000.flac", "vocals_001.flac"]
    for path, n in zip(paths, [44100, samples - 44100] * 2, strict=True):
        got = decode(path.read_bytes())
        assert (got.codec, got.samples, got.channels) == ("flac", n, 1)
    after = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    uploaded = [k for k in after - before if k.startswith("separations/inputs/")]
    assert len(uploaded) == 1 and uploaded[0].endswith(".wav")  # the local input, once
    assert "%" in capsys.readouterr().err  # streamed progress was shown


def test_remote_cli_without_api_key(monkeypatch, tmp_path, capsys):
    import runpod

    from handler.adapters import cli

    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    monkeypatch.setattr(runpod, "api_key", None)  # as with no ~/.runpod/config.toml
    song = tmp_path / "song.wav"
    write_input(song, 1.0)

    code = cli.main(["--input", str(song), "--output", str(tmp_path / "out"),
                     "--endpoint", "abc123", "--quiet"])

    assert code == 1
    assert "INVALID_INPUT: --endpoint needs RUNPOD_API_KEY" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

