"""Checks at the door (issue: hostile and odd inputs): a misconfigured destination fails before
any download, options with unbounded work are refused before any separation, S3 "folder"
events are skipped. Real servers (moto, a local HTTP server), real model, in-process jobs."""

from __future__ import annotations

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

from devtools.servers import LocalHTTPServer, LocalS3Server, Serve


@pytest.fixture(autouse=True)
def work_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fast_local_network: None) -> Path:
    return fresh_work_dir(monkeypatch, tmp_path, "DEFAULT_MODEL", "MODELS_DIR", "MAX_WORK_RATIO",
                          "MIN_WORK_BUDGET_S")


@pytest.fixture(scope="module")
def clip() -> tuple[bytes, int]:
    return input_bytes(2.0)


def song_url(http_server: LocalHTTPServer, clip: tuple[bytes, int]) -> str:
    return http_server.route("/song.wav", Serve(clip[0], "audio/wav"))


@pytest.mark.parametrize("how", ["env-bucket", "s3Config-bucket", "endpoint-down"])
def test_destination_checked_before_the_download(
    how: str, s3_env: str, s3_server: LocalS3Server, http_server: LocalHTTPServer,
    monkeypatch: pytest.MonkeyPatch, work_dir: Path, clip: tuple[bytes, int],
) -> None:
    url = song_url(http_server, clip)
    job: dict = {"id": "pre", "input": {"audio_url": url}}
    if how == "env-bucket":
        monkeypatch.setenv("BUCKET_NAME", "no-such-bucket-here")
        expected = "the output bucket 'no-such-bucket-here' does not exist"
    elif how == "s3Config-bucket":
        job["s3Config"] = {"accessId": s3_server.access_key_id,
                           "accessSecret": s3_server.secret_access_key,
                           "bucketName": "typo-bucket", "endpointUrl": s3_server.endpoint_url}
        expected = "the output bucket 'typo-bucket' does not exist"
    else:
        monkeypatch.setenv("BUCKET_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("S3_MAX_ATTEMPTS", "1")
        expected = "could not reach the output bucket"

    run = run_in_process(job)

    check_error(run, "UPLOAD_FAILED")
    assert expected in run.final["error"], run.final["error"]
    assert http_server.hits("/song.wav") == 0  # nothing was downloaded
    assert run.progress == []  # nor separated
    assert_clean(work_dir)
    if how == "endpoint-down":
        monkeypatch.setenv("BUCKET_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("BUCKET_NAME", s3_env)
    run = run_in_process({"id": "good", "input": {"audio_url": url}})
    assert run.final.get("status") == "completed", run.final


def test_unbounded_work_is_refused_before_separation(work_dir: Path, clip) -> None:
    run = run_in_process({"id": "bomb", "input": {
        "audio_base64": b64(clip[0]), "return_base64": True,
        "shifts": 20, "overlap": 0.95, "segment": 0.51}})
    check_error(run, "INVALID_INPUT")
    message = run.final["error"]
    assert "of model work for 2.0 s of audio" in message
    assert "lower shifts (20) or overlap (0.95)" in message and "raise segment (0.51)" in message
    assert not [p for p in run.progress if p["stage"] == "separate"]
    assert_clean(work_dir)
    run_good_job(work_dir, clip)


def test_work_budget_is_configurable(monkeypatch: pytest.MonkeyPatch, work_dir: Path,
                                     clip) -> None:
    job = {"id": "shifts", "input": {"audio_base64": b64(clip[0]), "return_base64": True,
                                     "shifts": 3}}
    assert run_in_process(job).final.get("status") == "completed"
    monkeypatch.setenv("MAX_WORK_RATIO", "1")
    monkeypatch.setenv("MIN_WORK_BUDGET_S", "1")
    check_error(run_in_process(job), "INVALID_INPUT")


def folder_event(key: str, minio: bool = False) -> dict:
    record = {"eventName": "ObjectCreated:Put" if not minio else "s3:ObjectCreated:Put",
              "s3": {"bucket": {"name": "music"}, "object": {"key": key, "size": 0}}}
    return {"Records": [record], **({"EventName": "s3:ObjectCreated:Put"} if minio else {})}


@pytest.mark.parametrize("minio", [False, True])
def test_s3_folder_marker_events_are_skipped(minio: bool, work_dir: Path) -> None:
    run = run_in_process({"id": "folder", "input": folder_event("uploads/new+folder/", minio)})
    assert run.final == {"status": "skipped", "reason": "the object is a folder marker",
                         "objects": ["s3://music/uploads/new folder/"]}
    assert run.progress == []
    assert_clean(work_dir)
