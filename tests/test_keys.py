"""Key and event rules (handler/transfer/keys.py): pure functions, no server."""

from __future__ import annotations

import pytest

from handler.errors import InvalidInput
from handler.transfer import keys

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/key.mp3", ("bucket", "key.mp3")),
        ("s3://my.bucket-1/a/b c?.mp3", ("my.bucket-1", "a/b c?.mp3")),
    ],
)
def test_parse_s3_uri(uri: str, expected: tuple[str, str]) -> None:
    assert keys.parse_s3_uri(uri) == expected


@pytest.mark.parametrize(
    "uri", ["s3://", "s3://bucket", "s3://bucket/", "s3:///key", "https://b/k", "bucket/key"]
)
def test_parse_s3_uri_malformed(uri: str) -> None:
    with pytest.raises(InvalidInput):
        keys.parse_s3_uri(uri)



# --- S3 events and key layout -------------------------------------------------------------

AWS_EVENT = {
    "Records": [
        {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-east-1",
            "eventTime": "2025-03-01T12:34:56.789Z",
            "eventName": "ObjectCreated:Put",
            "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
            "requestParameters": {"sourceIPAddress": "203.0.113.7"},
            "responseElements": {
                "x-amz-request-id": "C3D13FE58DE4C810",
                "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD",
            },
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "separate-on-upload",
                "bucket": {
                    "name": "my-music",
                    "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                    "arn": "arn:aws:s3:::my-music",
                },
                "object": {
                    "key": "uploads/My+Song+%281%29.mp3",
                    "size": 5242880,
                    "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                    "sequencer": "0055AED6DCD90281E5",
                },
            },
        },
        {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "eventName": "ObjectRemoved:Delete",
            "s3": {"bucket": {"name": "my-music"}, "object": {"key": "uploads/old.mp3"}},
        },
    ]
}

MINIO_EVENT = {
    "EventName": "s3:ObjectCreated:Put",
    "Key": "music/uploads/Caf%C3%A9+Song.flac",
    "Records": [
        {
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "awsRegion": "",
            "eventTime": "2025-03-01T12:34:56.789Z",
            "eventName": "s3:ObjectCreated:Put",
            "userIdentity": {"principalId": "minioadmin"},
            "requestParameters": {
                "principalId": "minioadmin", "region": "", "sourceIPAddress": "172.17.0.1"
            },
            "responseElements": {
                "content-length": "0",
                "x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf374d3b3fd1af9251148b658df7ac2e3e8",
                "x-amz-request-id": "17F8A6E1E2F1A2B3",
                "x-minio-deployment-id": "8f5c4b9e-5a1d-4c2e-9f3a-2b7d6e1c0a9f",
                "x-minio-origin-endpoint": "http://172.17.0.2:9000",
            },
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "Config",
                "bucket": {
                    "name": "music",
                    "ownerIdentity": {"principalId": "minioadmin"},
                    "arn": "arn:aws:s3:::music",
                },
                "object": {
                    "key": "uploads%2FCaf%C3%A9+Song.flac",
                    "size": 1234567,
                    "eTag": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
                    "contentType": "audio/flac",
                    "userMetadata": {"content-type": "audio/flac"},
                    "sequencer": "17F8A6E1E2F1A2B3",
                },
            },
            "source": {
                "host": "172.17.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7"
            },
        }
    ],
}


def test_parse_aws_event() -> None:
    assert keys.parse_s3_event(AWS_EVENT) == [("my-music", "uploads/My Song (1).mp3")]


def test_parse_minio_event() -> None:
    assert keys.parse_s3_event(MINIO_EVENT) == [("music", "uploads/Café Song.flac")]


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"audio_url": "https://example.com/a.mp3"},
        {"Records": "nope"},
        {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "my-music"},
        {"EventName": "s3:ObjectRemoved:Delete", "Records": [
            {"eventName": "s3:ObjectRemoved:Delete",
             "s3": {"bucket": {"name": "b"}, "object": {"key": "k"}}}]},
    ],
)
def test_parse_non_events(payload: dict) -> None:
    assert keys.parse_s3_event(payload) == []


def test_output_keys() -> None:
    assert keys.output_key("separations", "job-1", "vocals", "mp3") == (
        "separations/job-1/vocals.mp3"
    )
    assert keys.output_key("", "job-1", "vocals", ".wav") == "job-1/vocals.wav"
    assert keys.output_key("/a/b/", "j", "v", "flac") == "a/b/j/v.flac"


def test_event_output_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVENT_OUTPUT_PREFIX", raising=False)
    key = keys.event_output_key("uploads/song.mp3", "instrumental", "mp3")
    assert key == "uploads/separated/song/instrumental.mp3"
    assert keys.event_output_key("song.tar.mp3", "vocals", "wav", "out/") == (
        "out/song.tar/vocals.wav"
    )
    monkeypatch.setenv("EVENT_OUTPUT_PREFIX", "stems")
    assert keys.event_output_key("a/b/c.flac", "vocals", "flac") == "a/b/stems/c/vocals.flac"


def test_is_own_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVENT_OUTPUT_PREFIX", raising=False)
    own = keys.event_output_key("uploads/song.mp3", "vocals", "mp3")
    assert keys.is_own_output(own)
    assert not keys.is_own_output("uploads/song.mp3")
    assert not keys.is_own_output("uploads/separated.mp3")  # a file, not the folder
    assert not keys.is_own_output("separatedness/song.mp3")
    assert keys.is_own_output("x/out/sep/a/b.wav", "out/sep")
    assert not keys.is_own_output("x/out/a/sep/b.wav", "out/sep")
