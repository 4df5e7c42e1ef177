"""Every error code the worker returns, each reached by a real cause, in-process.

A failed job ends with exactly one item ``{"error": "CODE: message"}`` (progress items before
it never carry ``error``) and leaves nothing in WORK_DIR; each test ends with a good job in the
same process. Errors through the SDK's API server process: tests/test_worker_sdk.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from worker_helpers import (
    assert_clean,
    b64,
    check_error,
    free_port,
    fresh_work_dir,
    input_bytes,
    run_good_job,
    run_in_process,
)

from devtools.servers import AcceptPut, Html, Status

GOOD_SECONDS = 2.0


@pytest.fixture(autouse=True)
def work_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fast_local_network: None) -> Path:
    return fresh_work_dir(monkeypatch, tmp_path, "DEFAULT_MODEL", "MAX_DURATION_S", "MODELS_DIR")


@pytest.fixture(scope="module")
def good_input() -> tuple[bytes, int]:
    return input_bytes(GOOD_SECONDS)





# --- INVALID_INPUT ------------------------------------------------------------------------

URL = "https://example.com/a.mp3"  # never fetched: validation comes first
BAD_INPUTS = [  # (input, part of the message)
    ({"audio_url": URL, "return_base64": True, "stem": "vocals"}, "stem: unknown field"),
    ({"audio_url": URL, "s3_uri": "s3://b/a.mp3", "return_base64": True},
     "exactly one audio source"),
    ({"audio_url": URL, "return_base64": True, "stems": ["drums"]}, "has no stem 'drums'"),
    ({"audio_url": URL, "return_base64": True, "mp3_bitrate": 100}, "mp3_bitrate"),
    ({"audio_base64": "not base64 at all!", "return_base64": True}, "not valid base64"),
    ({"audio_url": URL, "model": "no-such-model", "return_base64": True}, "unknown model"),
    (["audio_url", URL], "must be a JSON object"),
]


def test_invalid_input(work_dir, good_input, http_server):
    for job_input, expected in BAD_INPUTS:
        run = run_in_process({"id": "bad", "input": job_input})
        check_error(run, "INVALID_INPUT")
        assert expected in run.final["error"], (job_input, run.final["error"])
        assert_clean(work_dir)

    # Too few output URLs: refused before any work, so the input is never fetched.
    src = http_server.route("/song.wav", Status(500))
    run = run_in_process({"id": "bad", "input": {
        "audio_url": src, "stems": ["instrumental", "vocals"],
        "output_urls": [http_server.url("/one")]}})
    check_error(run, "INVALID_INPUT")
    assert "1 URL(s) for 2 output file(s)" in run.final["error"]
    assert http_server.hits("/song.wav") == 0

    # A stem's URL can't take every interval file (each PUT would overwrite the last).
    data, _ = good_input
    put = http_server.route("/instrumental", AcceptPut())
    run = run_in_process({"id": "bad", "input": {
        "audio_base64": b64(data), "interval_cut": [1.0], "output_urls": {"instrumental": put}}})
    check_error(run, "INVALID_INPUT")
    assert "no URL for output 'instrumental_000'" in run.final["error"]
    assert http_server.hits("/instrumental") == 0
    assert_clean(work_dir)

    run_good_job(work_dir, good_input)


# --- DOWNLOAD_FAILED ----------------------------------------------------------------------


def test_download_failed(http_server, s3_env, s3_server, work_dir, good_input):
    url = http_server.route("/gone.mp3", Status(404))
    run = run_in_process({"id": "bad", "input": {"audio_url": url + "?token=s3cret",
                                                 "return_base64": True}})
    check_error(run, "DOWNLOAD_FAILED")
    assert "404" in run.final["error"] and "s3cret" not in run.final["error"]
    assert_clean(work_dir)

    run = run_in_process({"id": "bad", "input": {"s3_uri": f"s3://{s3_env}/nope.wav"}})
    check_error(run, "DOWNLOAD_FAILED")
    assert f"s3://{s3_env}/nope.wav does not exist" in run.final["error"]
    assert_clean(work_dir)

    presigned = s3_server.client().generate_presigned_url(
        "get_object", Params={"Bucket": s3_env, "Key": "nope.wav"}, ExpiresIn=600)
    run = run_in_process({"id": "bad", "input": {"audio_url": presigned}})
    check_error(run, "DOWNLOAD_FAILED")
    assert "404" in run.final["error"]
    assert "Signature" not in run.final["error"] and "Credential" not in run.final["error"]
    assert_clean(work_dir)

    run_good_job(work_dir, good_input)


# --- UNSUPPORTED_AUDIO --------------------------------------------------------------------


def test_unsupported_audio(http_server, work_dir, good_input):
    noise = os.urandom(64 * 1024)
    run = run_in_process({"id": "bad", "input": {"audio_base64": b64(noise),
                                                 "return_base64": True}})
    check_error(run, "UNSUPPORTED_AUDIO")
    assert_clean(work_dir)

    url = http_server.route("/share/song.mp3", Html())  # a sign-in page, not the file
    run = run_in_process({"id": "bad", "input": {"audio_url": url, "return_base64": True}})
    check_error(run, "UNSUPPORTED_AUDIO")
    assert_clean(work_dir)

    run_good_job(work_dir, good_input)


# --- TOO_LONG -----------------------------------------------------------------------------


def test_too_long(monkeypatch, work_dir, good_input):
    data, _ = input_bytes(3.0)
    monkeypatch.setenv("MAX_DURATION_S", "1")
    run = run_in_process({"id": "bad", "input": {"audio_base64": b64(data),
                                                 "return_base64": True}})
    check_error(run, "TOO_LONG")
    assert "limit is 1 s" in run.final["error"]
    assert_clean(work_dir)
    monkeypatch.delenv("MAX_DURATION_S")
    run_good_job(work_dir, good_input)


# --- MODEL_UNAVAILABLE --------------------------------------------------------------------


@pytest.fixture
def empty_models_dir(monkeypatch, tmp_path):
    from handler.core.models import unload_all

    empty = tmp_path / "models"
    empty.mkdir()
    monkeypatch.setenv("MODELS_DIR", str(empty))
    unload_all()
    try:
        yield empty
    finally:
        unload_all()


def test_model_not_baked(empty_models_dir, monkeypatch, work_dir, good_input):
    data, _ = good_input
    job = {"id": "bad", "input": {"audio_base64": b64(data), "model": "htdemucs",
                                  "return_base64": True}}
    for models_dir in (empty_models_dir, empty_models_dir / "not-there"):
        monkeypatch.setenv("MODELS_DIR", str(models_dir))
        run = run_in_process(job)
        check_error(run, "MODEL_UNAVAILABLE")
        assert "'htdemucs'" in run.final["error"] and "bake_models.py" in run.final["error"]
        assert_clean(work_dir)
    run_good_job(work_dir, good_input)  # the default model is unaffected


# --- UPLOAD_FAILED ------------------------------------------------------------------------


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_upload_failed(s3_env, monkeypatch, work_dir, good_input):
    data, _ = good_input
    source = {"audio_base64": b64(data)}

    # The worker's bucket is misconfigured (no such bucket): found before any work.
    monkeypatch.setenv("BUCKET_NAME", "no-such-bucket-here")
    run = run_in_process({"id": "bad", "input": source})
    check_error(run, "UPLOAD_FAILED")
    assert "NoSuchBucket" in run.final["error"]
    assert run.progress == []
    assert_clean(work_dir)

    # The caller's presigned URL: nothing listens there (retried, then given up).
    run = run_in_process({"id": "bad", "input": {
        **source, "output_urls": [closed_port_url() + "/x?X-Amz-Signature=abc"]}})
    check_error(run, "UPLOAD_FAILED")
    assert "connection refused" in run.final["error"] and "abc" not in run.final["error"]
    assert "after 4 attempts" in run.final["error"]
    assert_clean(work_dir)

    # No destination at all: refused before any work.
    monkeypatch.delenv("BUCKET_NAME")
    monkeypatch.delenv("BUCKET_ENDPOINT_URL")
    run = run_in_process({"id": "bad", "input": source})
    check_error(run, "UPLOAD_FAILED")
    assert "no output destination" in run.final["error"]
    assert run.progress == []
    assert_clean(work_dir)

    run_good_job(work_dir, good_input)


# --- INTERNAL -----------------------------------------------------------------------------


def test_internal(monkeypatch, tmp_path, work_dir, good_input):
    data, _ = good_input
    job = {"id": "bad", "input": {"audio_base64": b64(data), "return_base64": True}}

    # WORK_DIR under a regular file: the job can't even start, and says so as one item.
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("WORK_DIR", str(blocker / "work"))
    run = run_in_process(job)
    check_error(run, "INTERNAL")
    assert "WORK_DIR is not usable" in run.final["error"]
    assert str(tmp_path) not in run.final["error"]  # no paths leak
    monkeypatch.setenv("WORK_DIR", str(work_dir))

    # An operator's typo in a numeric setting is the worker's fault, not the caller's.
    monkeypatch.setenv("MAX_BASE64_OUTPUT_MB", "fifteen")
    run = run_in_process(job)
    check_error(run, "INTERNAL")
    assert run.final["error"] == "INTERNAL: unexpected ValueError"
    assert_clean(work_dir)
    monkeypatch.delenv("MAX_BASE64_OUTPUT_MB")

    run_good_job(work_dir, good_input)
