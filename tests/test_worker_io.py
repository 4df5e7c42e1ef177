"""The worker's sources and destinations, job by job in-process (``runner.run_job``),
against moto's S3 over real HTTP and the real spleeter_2stems model.

Every output is downloaded through what the result returned (a presigned URL, a data URI, or
the caller's own bucket for presigned PUTs) and decoded with PyAV: it must hold exactly the
input's samples (44.1 kHz in and out, gapless MP3) in the channel count asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from worker_helpers import (
    b64,
    check_audio,
    check_final,
    check_progress,
    fetch,
    input_bytes,
    run_in_process,
    write_input,
)

BUCKET_VARS = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY",
               "BUCKET_NAME", "BUCKET_REGION", "BUCKET_PREFIX")


@pytest.fixture(autouse=True)
def worker_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The default model, and a WORK_DIR of our own that every job must leave empty."""
    for name in ("DEFAULT_MODEL", "MAX_DURATION_S", "EVENT_OUTPUT_PREFIX", "BUCKET_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "work"
    monkeypatch.setenv("WORK_DIR", str(work))
    yield
    left = list(work.iterdir()) if work.exists() else []
    assert not left, f"a job left temp files: {left}"


@pytest.fixture
def no_bucket_env(monkeypatch: pytest.MonkeyPatch, fast_local_network: None) -> None:
    """A worker with no bucket of its own."""
    for name in BUCKET_VARS:
        monkeypatch.delenv(name, raising=False)


def upload_input(s3_server, bucket: str, key: str, tmp_path: Path, fmt: str = "wav",
                 seconds: float = 2.0) -> int:
    path = tmp_path / f"input.{fmt}"
    samples = write_input(path, seconds, fmt)
    s3_server.client().upload_file(str(path), bucket, key)
    return samples


def keys(s3_server, bucket: str) -> list[str]:
    listing = s3_server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


# --- sources ------------------------------------------------------------------------------


def test_presigned_get_input_to_default_bucket(s3_env, s3_server, tmp_path):
    samples = upload_input(s3_server, s3_env, "incoming/song.mp3", tmp_path, "mp3", 3.0)
    url = s3_server.client().generate_presigned_url(
        "get_object", Params={"Bucket": s3_env, "Key": "incoming/song.mp3"}, ExpiresIn=600)

    run = run_in_process({"id": "job-get-1", "input": {"audio_url": url}})

    check_progress(run.progress)
    check_final(run.final, n_outputs=1)
    assert run.final["input_duration_s"] == round(samples / 44100, 6)
    out = run.final["outputs"][0]
    assert out["stem"] == "instrumental" and out["format"] == "mp3" and out["bitrate"] == 192
    assert out["key"] == "separations/job-get-1/instrumental.mp3"
    assert out["bucket"] == s3_env
    head = s3_server.client().head_object(Bucket=s3_env, Key=out["key"])
    assert head["ContentType"] == "audio/mpeg"
    assert "X-Amz-Signature=" in out["url"]  # a presigned GET the caller can use as is
    check_audio(fetch(out["url"]), out, samples=samples, channels=1)


def test_s3_uri_input_stereo_wav(s3_env, s3_server, tmp_path):
    samples = upload_input(s3_server, s3_env, "in/a b.wav", tmp_path)

    run = run_in_process({"id": "job-uri", "input": {
        "s3_uri": f"s3://{s3_env}/in/a b.wav", "channels": 2, "output_format": "wav"}})

    check_progress(run.progress)
    check_final(run.final, n_outputs=1)
    out = run.final["outputs"][0]
    assert out["key"] == "separations/job-uri/instrumental.wav" and out["bitrate"] is None
    head = s3_server.client().head_object(Bucket=s3_env, Key=out["key"])
    assert head["ContentType"] == "audio/wav"
    check_audio(fetch(out["url"]), out, samples=samples, channels=2)


def aws_event(bucket: str, key: str) -> dict:
    """An AWS S3 ObjectCreated notification (keys arrive URL-encoded, '+' for a space)."""
    return {"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2024-05-01T12:00:00.000Z", "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AWS:EXAMPLE"},
        "requestParameters": {"sourceIPAddress": "203.0.113.9"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "separate-uploads",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                          "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": key.replace(" ", "+"), "size": 1024,
                          "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                          "sequencer": "0055AED6DCD90281E5"}},
    }]}


def minio_event(bucket: str, key: str) -> dict:
    """A MinIO bucket notification (webhook target): the event name and ``bucket/key`` at the
    top level too, the key percent-encoded ('/' as %2F)."""
    from urllib.parse import quote

    encoded = quote(key, safe="")
    return {
        "EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/{key}",
        "Records": [{
            "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
            "eventTime": "2024-05-01T12:00:00.000Z", "eventName": "s3:ObjectCreated:Put",
            "userIdentity": {"principalId": "minioadmin"},
            "requestParameters": {"principalId": "minioadmin", "region": "",
                                  "sourceIPAddress": "172.17.0.1"},
            "responseElements": {"x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf3",
                                 "x-amz-request-id": "17C6B1E7D1E7D0B5",
                                 "x-minio-deployment-id": "3b9b5cfa",
                                 "x-minio-origin-endpoint": "http://172.17.0.2:9000"},
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
                   "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"},
                              "arn": f"arn:aws:s3:::{bucket}"},
                   "object": {"key": encoded, "size": 1024, "eTag": "2b1c6d6f0b8e",
                              "contentType": "audio/wav",
                              "userMetadata": {"content-type": "audio/wav"},
                              "sequencer": "17C6B1E7D2A0C0B3"}},
            "source": {"host": "172.17.0.1", "port": "", "userAgent": "MinIO (linux; amd64)"},
        }],
    }


def test_s3_event_aws_writes_beside_input_and_own_output_is_skipped(s3_env, s3_server,
                                                                    tmp_path):
    samples = upload_input(s3_server, s3_env, "uploads/my song.wav", tmp_path)

    run = run_in_process({"id": "evt-1", "input": aws_event(s3_env, "uploads/my song.wav")})

    check_progress(run.progress)
    check_final(run.final, n_outputs=1)
    assert run.final["source"] == f"s3://{s3_env}/uploads/my song.wav"
    out = run.final["outputs"][0]
    assert out["key"] == "uploads/separated/my song/instrumental.mp3"
    assert out["bucket"] == s3_env
    check_audio(fetch(out["url"]), out, samples=samples, channels=1)
    before = keys(s3_server, s3_env)
    assert before == ["uploads/my song.wav", "uploads/separated/my song/instrumental.mp3"]

    # Our own upload fires the same trigger: it must not start another separation.
    again = run_in_process({"id": "evt-2", "input": aws_event(s3_env, out["key"])})

    assert again.progress == []
    assert again.final["status"] == "skipped", again.final
    assert again.final["objects"] == [f"s3://{s3_env}/{out['key']}"]
    assert "error" not in again.final
    assert keys(s3_server, s3_env) == before


def test_s3_event_minio_two_stems(s3_env, s3_server, tmp_path):
    samples = upload_input(s3_server, s3_env, "tracks/2024/song.flac", tmp_path, "flac")
    event = minio_event(s3_env, "tracks/2024/song.flac")

    run = run_in_process({"id": "evt-minio", "input": {**event,
                                                       "stems": ["instrumental", "vocals"]}})

    check_progress(run.progress)
    check_final(run.final, n_outputs=2)
    outs = run.final["outputs"]
    assert [o["stem"] for o in outs] == ["instrumental", "vocals"]
    assert [o["key"] for o in outs] == ["tracks/2024/separated/song/instrumental.mp3",
                                        "tracks/2024/separated/song/vocals.mp3"]
    for out in outs:
        check_audio(fetch(out["url"]), out, samples=samples, channels=1)


# --- destinations -----------------------------------------------------------------------


def presigned_puts(s3_server, bucket: str, names: list[str]) -> dict[str, str]:
    client = s3_server.client()
    return {name: client.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": f"results/{name}"}, ExpiresIn=600)
        for name in names}


def caller_object(s3_server, bucket: str, key: str) -> tuple[bytes, str]:
    obj = s3_server.client().get_object(Bucket=bucket, Key=key)
    return obj["Body"].read(), obj["ContentType"]


def test_presigned_put_list(no_bucket_env, s3_server):
    bucket = s3_server.create_bucket()  # the caller's bucket: the worker has no credentials
    urls = presigned_puts(s3_server, bucket, ["first.mp3", "second.mp3"])
    data, samples = input_bytes(2.0)

    run = run_in_process({"id": "put-list", "input": {
        "audio_base64": b64(data), "stems": ["instrumental", "vocals"],
        "output_urls": list(urls.values())}})

    check_progress(run.progress)
    check_final(run.final, n_outputs=2)
    for out, key in zip(run.final["outputs"], ["results/first.mp3", "results/second.mp3"],
                        strict=True):
        assert out["key"] is None
        assert "?" not in out["url"] and out["url"].endswith(key)  # signature not echoed
        body, content_type = caller_object(s3_server, bucket, key)
        assert content_type == "audio/mpeg"
        check_audio(body, out, samples=samples, channels=1)
    assert [o["stem"] for o in run.final["outputs"]] == ["instrumental", "vocals"]


def test_presigned_put_dict_flac_stereo(no_bucket_env, s3_server):
    bucket = s3_server.create_bucket()
    urls = presigned_puts(s3_server, bucket, ["v.flac", "i.flac"])
    data, samples = input_bytes(2.0)

    run = run_in_process({"id": "put-dict", "input": {
        "audio_base64": b64(data), "stems": "vocals,instrumental", "output_format": "flac",
        "channels": 2, "output_urls": {"vocals": urls["v.flac"],
                                       "instrumental": urls["i.flac"]}}})

    check_progress(run.progress)
    check_final(run.final, n_outputs=2)
    by_stem = {o["stem"]: o for o in run.final["outputs"]}
    for stem, key in (("vocals", "results/v.flac"), ("instrumental", "results/i.flac")):
        body, content_type = caller_object(s3_server, bucket, key)
        assert content_type == "audio/flac"
        check_audio(body, by_stem[stem], samples=samples, channels=2)


def test_s3config_output_without_worker_bucket(no_bucket_env, s3_server):
    bucket = s3_server.create_bucket()
    secret = s3_server.secret_access_key
    data, samples = input_bytes(2.0)
    s3_config = {"accessId": s3_server.access_key_id, "accessSecret": secret,
                 "bucketName": bucket, "endpointUrl": s3_server.endpoint_url}

    run = run_in_process({"id": "cfg-1", "s3Config": s3_config, "input": {
        "audio_base64": b64(data), "output_format": "wav"}})

    check_progress(run.progress)
    check_final(run.final, n_outputs=1)
    out = run.final["outputs"][0]
    assert out["key"] == "separations/cfg-1/instrumental.wav" and out["bucket"] == bucket
    check_audio(fetch(out["url"]), out, samples=samples, channels=1)
    assert secret not in json.dumps(run.final)

    # RunPod's style: the bucket (and a key prefix) in endpointUrl's path; our "prefix" too.
    run = run_in_process({"id": "cfg-2", "input": {"audio_base64": b64(data)}, "s3Config": {
        "accessId": s3_server.access_key_id, "accessSecret": secret,
        "endpointUrl": f"{s3_server.endpoint_url}/{bucket}/team-a", "prefix": "mine"}})

    check_final(run.final, n_outputs=1)
    out = run.final["outputs"][0]
    assert out["key"] == "team-a/mine/cfg-2/instrumental.mp3" and out["bucket"] == bucket
    check_audio(fetch(out["url"]), out, samples=samples, channels=1)


def test_base64_in_and_out(no_bucket_env):
    data, samples = input_bytes(2.0, "flac")

    run = run_in_process({"id": "b64", "input": {
        "audio_base64": f"data:audio/flac;base64,{b64(data)}", "return_base64": True,
        "stems": ["instrumental", "vocals"], "channels": 2, "mp3_bitrate": 128}})

    check_progress(run.progress)
    check_final(run.final, n_outputs=2)
    for out in run.final["outputs"]:
        assert out["url"].startswith("data:audio/mpeg;base64,") and out["key"] is None
        assert out["bitrate"] == 128
        check_audio(fetch(out["url"]), out, samples=samples, channels=2)


def test_interval_cut_to_default_bucket(s3_env, s3_server, tmp_path):
    samples = upload_input(s3_server, s3_env, "long.wav", tmp_path, seconds=3.0)

    run = run_in_process({"id": "cut", "input": {
        "s3_uri": f"s3://{s3_env}/long.wav", "interval_cut": "1, 2.5"}})

    check_progress(run.progress)
    check_final(run.final, n_outputs=3)
    expected = [(0, 0.0, 44100), (1, 1.0, 66150), (2, 2.5, samples - 110250)]
    for out, (index, start, n) in zip(run.final["outputs"], expected, strict=True):
        assert (out["interval"], out["start_s"]) == (index, start)
        assert out["key"] == f"separations/cut/instrumental_{index:03d}.mp3"
        check_audio(fetch(out["url"]), out, samples=n, channels=1)
    assert sum(o["duration_s"] for o in run.final["outputs"]) == pytest.approx(samples / 44100)


def test_interval_cut_to_presigned_put_dict(no_bucket_env, s3_server):
    bucket = s3_server.create_bucket()
    urls = presigned_puts(s3_server, bucket, ["instrumental_000", "instrumental_001"])
    data, samples = input_bytes(2.0)

    run = run_in_process({"id": "cut-put", "input": {
        "audio_base64": b64(data), "interval_cut": [0.5], "output_format": "wav",
        "output_urls": urls}})

    check_final(run.final, n_outputs=2)
    for out, n in zip(run.final["outputs"], [22050, samples - 22050], strict=True):
        key = f"results/instrumental_{out['interval']:03d}"
        body, _ = caller_object(s3_server, bucket, key)
        check_audio(body, out, samples=n, channels=1)
