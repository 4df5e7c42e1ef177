"""Storage against moto's S3 server and the local HTTP server, over real HTTP."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.exceptions import EndpointConnectionError

from devtools.net import free_port
from devtools.servers import AcceptPut, LocalHTTPServer, LocalS3Server, Status
from handler.errors import DownloadFailed, InvalidInput, UploadFailed
from handler.redact import scrub
from handler.transfer import http, keys
from handler.transfer import s3 as storage
from handler.transfer.s3 import S3Settings

MB = 1024 * 1024


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 MB: above the 16 MB multipart threshold, so two parts."""
    path = tmp_path_factory.mktemp("big") / "instrumental.wav"
    path.write_bytes(os.urandom(20 * MB))
    return path


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "vocals.mp3"
    path.write_bytes(os.urandom(300 * 1024))
    return path


@pytest.fixture
def s3(s3_server: LocalS3Server) -> tuple[Any, str]:
    """(client made by storage.make_client, fresh bucket)."""
    bucket = s3_server.create_bucket()
    return storage.make_client(s3_server.settings(bucket)), bucket


# --- upload / presign -----------------------------------------------------------------------


def test_upload_presign_and_get(s3: tuple[Any, str], small_file: Path) -> None:
    client, bucket = s3
    key = keys.output_key("separations", "job-1", "vocals", "mp3")
    storage.upload_file(client, small_file, bucket, key, "audio/mpeg", metadata={"model": "x"})
    url = storage.presign_get(client, bucket, key, 3600)
    assert "X-Amz-Signature=" in url and f"/{bucket}/separations/job-1/vocals.mp3?" in url
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200
    assert resp.content == small_file.read_bytes()
    assert resp.headers["Content-Type"] == "audio/mpeg"
    assert client.head_object(Bucket=bucket, Key=key)["Metadata"] == {"model": "x"}


def test_multipart_upload(s3: tuple[Any, str], big_file: Path) -> None:
    client, bucket = s3
    storage.upload_file(client, big_file, bucket, "big.wav", "audio/wav")
    head = client.head_object(Bucket=bucket, Key="big.wav")
    assert head["ETag"].strip('"').endswith("-2")  # a multipart ETag: "<md5>-<parts>"
    body = client.get_object(Bucket=bucket, Key="big.wav")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(big_file.read_bytes()).digest()


def test_failed_multipart_upload_is_aborted(s3: tuple[Any, str], big_file: Path) -> None:
    client, bucket = s3

    def fail_second_part(params: dict, **_: Any) -> None:
        if params.get("PartNumber") == 2:  # the network dies halfway through
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1")

    client.meta.events.register("before-parameter-build.s3.UploadPart", fail_second_part)
    with pytest.raises(UploadFailed, match="could not connect"):
        storage.upload_file(client, big_file, bucket, "big.wav", "audio/wav")
    client.meta.events.unregister("before-parameter-build.s3.UploadPart", fail_second_part)
    assert "Uploads" not in client.list_multipart_uploads(Bucket=bucket)
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_upload_to_missing_bucket(s3_server: LocalS3Server, small_file: Path) -> None:
    client = storage.make_client(s3_server.settings("no-such-bucket"), max_attempts=1)
    with pytest.raises(UploadFailed, match="NoSuchBucket"):
        storage.upload_file(client, small_file, "no-such-bucket", "k", "audio/mpeg")


def test_upload_to_closed_port_fails_fast(s3_server: LocalS3Server, small_file: Path) -> None:
    settings = s3_server.settings("b", endpoint_url=f"http://127.0.0.1:{free_port()}")
    client = storage.make_client(settings, max_attempts=1, connect_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(UploadFailed) as info:
        storage.upload_file(client, small_file, "b", "k", "audio/mpeg")
    assert time.monotonic() - started < 5
    assert "could not connect" in str(info.value)
    assert s3_server.secret_access_key not in str(info.value)


def test_presign_expiry_clamped(s3: tuple[Any, str]) -> None:
    client, bucket = s3
    assert "X-Amz-Expires=604800" in storage.presign_get(client, bucket, "k", 10**9)


# --- put_presigned ------------------------------------------------------------------------


@pytest.mark.usefixtures("fast_local_network")
def test_put_presigned_to_s3(s3: tuple[Any, str], big_file: Path) -> None:
    client, bucket = s3
    url = client.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": "out/inst.wav"}, ExpiresIn=600
    )
    http.put_presigned(url, big_file, "audio/wav")
    obj = client.get_object(Bucket=bucket, Key="out/inst.wav")
    assert obj["ContentLength"] == big_file.stat().st_size
    assert obj["ContentType"] == "audio/wav"


@pytest.mark.usefixtures("fast_local_network")
def test_put_presigned_to_http_server(http_server: LocalHTTPServer, small_file: Path) -> None:
    url = http_server.route("/up/v.mp3", AcceptPut(201))
    http.put_presigned(url + "?sig=abc", small_file, "audio/mpeg")
    upload = http_server.uploads["/up/v.mp3"]
    assert upload.body == small_file.read_bytes()
    assert upload.headers["Content-Type"] == "audio/mpeg"
    assert upload.headers["Content-Length"] == str(small_file.stat().st_size)
    assert "Transfer-Encoding" not in upload.headers


@pytest.mark.usefixtures("fast_local_network")
def test_put_presigned_client_error_not_retried(
    http_server: LocalHTTPServer, small_file: Path
) -> None:
    url = http_server.route("/up", Status(403))
    with pytest.raises(UploadFailed, match="HTTP 403") as info:
        http.put_presigned(url + "?X-Amz-Signature=feedface", small_file, "audio/mpeg")
    assert "feedface" not in str(info.value)
    assert http_server.hits("/up") == 1


@pytest.mark.usefixtures("fast_local_network")
def test_put_presigned_server_errors_retried(
    http_server: LocalHTTPServer, small_file: Path
) -> None:
    url = http_server.route("/up", Status(500), Status(503), AcceptPut())
    http.put_presigned(url, small_file, "audio/mpeg")
    assert http_server.hits("/up") == 3 and "/up" in http_server.uploads
    url = http_server.route("/down", Status(502))
    with pytest.raises(UploadFailed, match="HTTP 502.*after 2 attempts"):
        http.put_presigned(url, small_file, "audio/mpeg", retries=1)


@pytest.mark.usefixtures("fast_local_network")
def test_put_presigned_connection_refused(small_file: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/up"
    with pytest.raises(UploadFailed, match="connection refused"):
        http.put_presigned(url, small_file, "audio/mpeg", retries=1)


def test_put_presigned_checks_url(
    http_server: LocalHTTPServer, small_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ALLOW_PRIVATE_URLS", raising=False)
    url = http_server.route("/up", AcceptPut())
    with pytest.raises(InvalidInput, match="loopback"):
        http.put_presigned(url, small_file, "audio/mpeg")
    with pytest.raises(InvalidInput):
        http.put_presigned("file:///tmp/x", small_file, "audio/mpeg")
    assert http_server.hits("/up") == 0


# --- download_object ------------------------------------------------------------------------


def test_download_object(s3: tuple[Any, str], small_file: Path, tmp_path: Path) -> None:
    client, bucket = s3
    client.upload_file(str(small_file), bucket, "in/song.mp3",
                       ExtraArgs={"ContentType": "audio/mpeg"})
    info = storage.download_object(client, bucket, "in/song.mp3", tmp_path / "d" / "song.mp3",
                                   max_bytes=MB)
    assert info.path.read_bytes() == small_file.read_bytes()
    assert (info.bytes, info.content_type) == (small_file.stat().st_size, "audio/mpeg")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["song.mp3"]
    with pytest.raises(DownloadFailed, match=r"larger than the 0.25 MB limit"):
        storage.download_object(client, bucket, "in/song.mp3", tmp_path / "x", max_bytes=MB // 4)
    assert not (tmp_path / "x").exists()


def test_download_object_missing(s3: tuple[Any, str], tmp_path: Path) -> None:
    client, bucket = s3
    with pytest.raises(DownloadFailed, match=f"s3://{bucket}/nope.mp3 does not exist"):
        storage.download_object(client, bucket, "nope.mp3", tmp_path / "a", max_bytes=MB)
    with pytest.raises(DownloadFailed, match="does not exist"):
        storage.download_object(client, "no-such-bucket-x", "a.mp3", tmp_path / "a", max_bytes=MB)


def test_download_object_access_denied(
    http_server: LocalHTTPServer, s3_server: LocalS3Server, tmp_path: Path
) -> None:
    # The local HTTP server plays an S3 endpoint that refuses us (moto doesn't enforce IAM).
    http_server.route("/b/k.mp3", Status(403))
    settings = s3_server.settings("b", endpoint_url=http_server.base_url)
    client = storage.make_client(settings, max_attempts=1)
    with pytest.raises(DownloadFailed, match="access denied to s3://b/k.mp3"):
        storage.download_object(client, "b", "k.mp3", tmp_path / "a", max_bytes=MB)


# --- settings -------------------------------------------------------------------------------


def test_settings_from_env_virtual_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BUCKET_NAME", "BUCKET_REGION", "BUCKET_PREFIX", "PRESIGN_EXPIRY_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "https://my-bucket.s3.eu-west-1.amazonaws.com")
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "AKIAENVEXAMPLE000001")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "env-secret-ABCDEFGHIJKLMNOP")
    s = S3Settings.from_env()
    assert (s.endpoint_url, s.bucket, s.region) == (
        "https://s3.eu-west-1.amazonaws.com", "my-bucket", "eu-west-1"
    )
    assert (s.prefix, s.presign_expiry_s, s.configured) == ("separations", 86400, True)
    assert "env-secret" not in repr(s)
    assert scrub("key=env-secret-ABCDEFGHIJKLMNOP") == "key=<redacted>"


def test_settings_from_env_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "https://acct.r2.cloudflarestorage.com")
    monkeypatch.setenv("BUCKET_NAME", "stems")
    monkeypatch.setenv("BUCKET_REGION", "auto")
    monkeypatch.setenv("BUCKET_PREFIX", "/out/")
    monkeypatch.setenv("PRESIGN_EXPIRY_S", "3600")
    s = S3Settings.from_env()
    assert (s.endpoint_url, s.bucket, s.region, s.prefix, s.presign_expiry_s) == (
        "https://acct.r2.cloudflarestorage.com", "stems", "auto", "out", 3600
    )


@pytest.mark.usefixtures("fast_local_network")  # the caller's endpoint is on loopback
def test_settings_from_s3_config_bucket_in_path(
    s3_server: LocalS3Server, small_file: Path
) -> None:
    bucket = s3_server.create_bucket()
    s = S3Settings.from_s3_config({
        "accessId": s3_server.access_key_id,
        "accessSecret": s3_server.secret_access_key,
        "endpointUrl": f"{s3_server.endpoint_url}/{bucket}",
    })
    assert (s.endpoint_url, s.bucket) == (s3_server.endpoint_url, bucket)
    storage.upload_file(storage.make_client(s), small_file, s.bucket, "k.mp3", "audio/mpeg")
    assert s3_server.client().head_object(Bucket=bucket, Key="k.mp3")["ContentLength"] > 0
    assert s3_server.secret_access_key not in scrub(f"oops {s3_server.secret_access_key}")


def test_settings_from_s3_config_explicit_bucket() -> None:
    s = S3Settings.from_s3_config({
        "accessId": "AKIACFGEXAMPLE000001", "accessSecret": "cfg-secret-0123456789",
        "bucketName": "music", "endpointUrl": "https://music.nyc3.digitaloceanspaces.com",
    })
    assert (s.endpoint_url, s.bucket, s.region) == (
        "https://nyc3.digitaloceanspaces.com", "music", "nyc3"
    )
    # No endpointUrl: AWS's default endpoint; extra keys (pydantic's model_dump) are fine.
    s = S3Settings.from_s3_config({
        "accessId": "AKIACFGEXAMPLE000001", "accessSecret": "cfg-secret-0123456789",
        "bucketName": "music", "endpointUrl": None, "region": "eu-central-1",
    })
    assert (s.endpoint_url, s.bucket, s.region) == (None, "music", "eu-central-1")


def test_s3_config_endpoint_is_ssrf_checked(
    s3_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ALLOW_PRIVATE_URLS", raising=False)
    creds = {"accessId": "AKIACFGEXAMPLE000001", "accessSecret": "cfg-secret-0123456789"}
    for endpoint in ("http://169.254.169.254/b", "http://[::1]:9000/b",
                     "http://metadata.google.internal/b"):
        with pytest.raises(InvalidInput):
            S3Settings.from_s3_config({**creds, "endpointUrl": endpoint})
    # A host name is only resolved when the client is made (parsing input stays offline).
    local = s3_server.endpoint_url.replace("127.0.0.1", "localhost") + "/b"
    settings = S3Settings.from_s3_config({**creds, "endpointUrl": local})
    with pytest.raises(InvalidInput, match="loopback"):
        storage.make_client(settings)
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "1")
    storage.make_client(settings)
    with pytest.raises(InvalidInput, match="link-local"):
        S3Settings.from_s3_config({**creds, "endpointUrl": "http://169.254.169.254/b"})
    settings = S3Settings.from_s3_config({**creds, "endpointUrl": "https://s3.nowhere.invalid/b"})
    with pytest.raises(UploadFailed, match="could not resolve"):
        storage.make_client(settings)
    # The operator's env endpoint is trusted as configured.
    storage.make_client(s3_server.settings("b"))


@pytest.mark.parametrize(
    "cfg",
    [
        "not a dict",
        {"accessSecret": "x", "endpointUrl": "https://s3.example.com/b"},
        {"accessId": "x", "accessSecret": "y", "endpointUrl": "https://acct.r2.example.com"},
        {"accessId": "x", "accessSecret": "y", "endpointUrl": "ftp://s3.example.com/b"},
        {"accessId": "x", "accessSecret": "y"},
        {"accessId": "x", "accessSecret": "", "bucketName": "b"},
    ],
)
def test_settings_from_s3_config_invalid(cfg: Any) -> None:
    with pytest.raises(InvalidInput):
        S3Settings.from_s3_config(cfg)
