"""S3-compatible storage: our own boto3 client (not runpod's rp_upload), uploads, downloads and
presigned GET URLs. Key layout and event parsing are in ``keys``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from handler import config
from handler.errors import DownloadFailed, InvalidInput, UploadFailed
from handler.redact import redact_url, register_secret
from handler.transfer import netguard
from handler.transfer.http import (
    DownloadInfo,
)

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 16 * 1024 * 1024
TRANSFER_CONFIG = TransferConfig(
    multipart_threshold=MULTIPART_THRESHOLD,
    multipart_chunksize=MULTIPART_THRESHOLD,
    max_concurrency=4,
)
MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600  # SigV4 refuses longer

# Endpoints that name the bucket in the host ("virtual-hosted style") on providers known to
# use it: AWS, Wasabi, Backblaze B2 ("<bucket>.s3[.-]<region>...") and DigitalOcean Spaces.
# Anything else (R2's "<account>.r2.cloudflarestorage.com", MinIO ...) is left alone.
_VHOST = re.compile(
    r"^(?P<bucket>[a-z0-9][a-z0-9.-]*?)\."
    r"(?P<rest>s3[.-](?:[a-z0-9-]+\.)*(?:amazonaws\.com|wasabisys\.com|backblazeb2\.com)"
    r"|[a-z0-9-]+\.digitaloceanspaces\.com)$"
)
_REGION = re.compile(
    r"(?:^|\.)s3[.-](?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\."
    r"|^(?P<do>[a-z]+\d+)\.digitaloceanspaces\.com$"
)


# --- settings and client -----------------------------------------------------------------


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None
    access_key_id: str | None
    secret_access_key: str | None = field(repr=False)
    bucket: str | None
    region: str = "us-east-1"
    prefix: str = "separations"
    presign_expiry_s: int = 86400
    # True for a caller's s3Config: its endpoint is a caller-supplied URL, so make_client
    # runs it through netguard like any other (the env's endpoint is the operator's).
    from_caller: bool = field(default=False, repr=False)

    @property
    def configured(self) -> bool:
        """Enough to upload: a bucket (credentials may come from boto3's default chain)."""
        return bool(self.bucket)

    @classmethod
    def from_env(cls) -> S3Settings:
        """RunPod's standard BUCKET_* variables plus our BUCKET_NAME/REGION/PREFIX."""
        return _build(
            endpoint=os.environ.get("BUCKET_ENDPOINT_URL", "").strip() or None,
            access_key_id=os.environ.get("BUCKET_ACCESS_KEY_ID", "").strip() or None,
            secret=os.environ.get("BUCKET_SECRET_ACCESS_KEY", "").strip() or None,
            bucket=os.environ.get("BUCKET_NAME", "").strip() or None,
            region=os.environ.get("BUCKET_REGION", "").strip() or None,
            prefix=_env_prefix(),
        )

    @classmethod
    def from_s3_config(cls, d: Any) -> S3Settings:
        """RunPod's per-request ``s3Config``: accessId, accessSecret, bucketName, endpointUrl
        (optional: AWS's default endpoint), region (optional). Extra keys are ignored."""
        if not isinstance(d, dict):
            raise InvalidInput("s3Config must be an object")
        for name in ("accessId", "accessSecret"):
            if not isinstance(d.get(name), str) or not d[name].strip():
                raise InvalidInput(f"s3Config.{name} is required")
        for name in ("bucketName", "endpointUrl", "region", "prefix"):
            if d.get(name) is not None and not isinstance(d[name], str):
                raise InvalidInput(f"s3Config.{name} must be a string")
        settings = _build(
            endpoint=(d.get("endpointUrl") or "").strip() or None,
            access_key_id=d["accessId"].strip(),
            secret=d["accessSecret"].strip(),
            bucket=(d.get("bucketName") or "").strip() or None,
            region=(d.get("region") or "").strip() or None,
            prefix=(d.get("prefix") or "").strip() or _env_prefix(),
        )
        if not settings.bucket:
            raise InvalidInput("s3Config.bucketName is required (endpointUrl names no bucket)")
        if settings.endpoint_url:  # fail obvious SSRF now; make_client re-checks with DNS
            netguard.check_url(settings.endpoint_url, resolve_host=False,
                               allow_private=config.allow_private_urls())
        return dataclasses.replace(settings, from_caller=True)


def _env_prefix() -> str:
    return config.env_str("BUCKET_PREFIX", "separations")


def _build(
    *,
    endpoint: str | None,
    access_key_id: str | None,
    secret: str | None,
    bucket: str | None,
    region: str | None,
    prefix: str,
) -> S3Settings:
    register_secret(secret)
    register_secret(access_key_id)
    extra_prefix = ""
    if endpoint:
        endpoint, bucket, extra_prefix = split_endpoint(endpoint, bucket)
        region = region or region_from_endpoint(endpoint)
    expiry = config.env_int("PRESIGN_EXPIRY_S", 86400)
    return S3Settings(
        endpoint_url=endpoint,
        access_key_id=access_key_id,
        secret_access_key=secret,
        bucket=bucket,
        region=region or "us-east-1",
        prefix="/".join(p for p in (extra_prefix, prefix.strip("/")) if p),
        presign_expiry_s=max(1, min(expiry, MAX_PRESIGN_EXPIRY_S)),
    )


def split_endpoint(endpoint: str, bucket: str | None) -> tuple[str, str | None, str]:
    """Split a RunPod-style endpoint URL into (service endpoint, bucket, key prefix).

    ``https://s3.example.com/bucket/some/prefix`` -> ("https://s3.example.com", "bucket",
    "some/prefix"); ``https://bucket.s3.us-east-1.amazonaws.com`` -> ("https://s3.us-east-1.
    amazonaws.com", "bucket", ""). An explicit ``bucket`` wins; the endpoint's path is taken
    as that bucket (and prefix) only when it starts with it or no bucket was given.
    """
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise InvalidInput(f"malformed storage endpoint URL: {redact_url(endpoint)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"storage endpoint must be an http(s) URL: {redact_url(endpoint)}")
    netloc = parts.netloc.rsplit("@", 1)[-1]
    segments = [s for s in parts.path.split("/") if s]
    prefix = ""
    if segments and (bucket is None or segments[0] == bucket):
        bucket, prefix = segments[0], "/".join(segments[1:])
    elif segments:
        prefix = "/".join(segments)  # a path the bucket isn't in: keep it as a key prefix
    vhost = _VHOST.match(netloc.lower())
    if vhost and (bucket is None or vhost["bucket"] == bucket):
        bucket = vhost["bucket"]
        netloc = netloc[len(bucket) + 1:]
    return urlunsplit((parts.scheme, netloc, "", "", "")), bucket, prefix


def region_from_endpoint(endpoint: str) -> str | None:
    """``us-west-2`` from ``https://s3.us-west-2.amazonaws.com``, ``nyc3`` from DO Spaces."""
    host = (urlsplit(endpoint).hostname or "").lower()
    m = _REGION.search(host)
    return (m["region"] or m["do"]) if m else None


_session_lock = threading.Lock()


@functools.cache
def _shared_session() -> boto3.session.Session:
    # One session for all clients: it caches the parsed service model, which otherwise
    # costs ~0.5 s per client. Sessions aren't thread-safe, hence the lock around .client().
    return boto3.session.Session()


def make_client(
    settings: S3Settings,
    *,
    max_attempts: int | None = None,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 60.0,
) -> Any:
    """A boto3 S3 client for ``settings`` (path-style for custom endpoints, standard retries).

    A caller-supplied endpoint (``from_caller``) must pass netguard.check_url; boto3's
    connections aren't pinned to the checked address, so DNS rebinding stays possible there.
    ``max_attempts`` defaults to env S3_MAX_ATTEMPTS (4).
    """
    max_attempts = config.s3_max_attempts() if max_attempts is None else max_attempts
    if settings.from_caller and settings.endpoint_url:
        try:
            netguard.check_url(settings.endpoint_url, allow_private=config.allow_private_urls())
        except DownloadFailed as e:  # DNS failure: the storage endpoint is what's unreachable
            raise UploadFailed(f"storage endpoint: {e.message}") from None
    host = (urlsplit(settings.endpoint_url).hostname or "") if settings.endpoint_url else ""
    s3_options: dict[str, Any] = {}
    if settings.endpoint_url and not host.endswith(".amazonaws.com"):
        # MinIO, R2, moto ... don't have per-bucket DNS names; AWS prefers virtual hosts.
        s3_options["addressing_style"] = "path"
    cfg = Config(
        signature_version="s3v4",
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        # total_max_attempts counts the first request (botocore's max_attempts doesn't).
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        s3=s3_options,
        # botocore >= 1.36 adds CRC checksums by default, which several S3-compatible
        # stores reject; only send them where the API requires one.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    with _session_lock:
        return _shared_session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            region_name=settings.region,
            config=cfg,
        )


def _describe_boto_error(exc: BaseException) -> str:
    """A short, secret-free cause: the S3 error code, or the kind of network failure."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = err.get("Code") or "error"
            return f"{code} (HTTP {status})" if status else str(code)
        if isinstance(e, EndpointConnectionError):
            return "could not connect to the storage endpoint"
        if isinstance(e, BotoCoreError):
            return type(e).__name__
        e = e.__cause__ or e.__context__
    return type(exc).__name__


# --- upload ------------------------------------------------------------------------------


def list_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """Every object key under ``prefix`` (folder markers left out), in key order."""
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                      Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/"))
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code")
        if code in ("NoSuchBucket", "AccessDenied"):
            raise DownloadFailed(f"cannot list s3://{bucket}/{prefix}: {code}") from None
        raise DownloadFailed(f"cannot list s3://{bucket}/{prefix}: "
                             f"{_describe_boto_error(e)}") from None
    except BotoCoreError as e:
        raise DownloadFailed(f"cannot list s3://{bucket}/{prefix}: "
                             f"{_describe_boto_error(e)}") from None
    return sorted(keys)


def upload_file(
    client: Any,
    path: Path,
    bucket: str,
    key: str,
    content_type: str,
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Upload ``path`` to s3://bucket/key (multipart above 16 MB); failure -> UploadFailed.

    A single PUT and a completed multipart upload are both atomic, so a failure never leaves
    a partial object at ``key``; s3transfer aborts a failed multipart upload.
    """
    extra: dict[str, Any] = {"ContentType": content_type}
    if metadata:
        extra["Metadata"] = metadata
    try:
        client.upload_file(str(path), bucket, key, ExtraArgs=extra, Config=TRANSFER_CONFIG)
    except (BotoCoreError, ClientError, Boto3Error) as e:
        raise UploadFailed(
            f"could not upload s3://{bucket}/{key}: {_describe_boto_error(e)}"
        ) from None
    log.info("uploaded s3://%s/%s", bucket, key)


def check_bucket(client: Any, bucket: str) -> None:
    """Fail now, not after the work, when ``bucket`` is missing, the credentials are refused or
    the endpoint is down (a HEAD cannot prove PutObject is allowed: the upload still may fail)."""
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            raise UploadFailed(f"the output bucket {bucket!r} does not exist (NoSuchBucket)") \
                from None
        if status in (401, 403):
            raise UploadFailed(f"access to the output bucket {bucket!r} was refused (HTTP "
                               f"{status}): check the credentials") from None
        raise UploadFailed(f"could not reach the output bucket {bucket!r}: "
                           f"{_describe_boto_error(e)}") from None
    except (BotoCoreError, Boto3Error) as e:
        raise UploadFailed(f"could not reach the output bucket {bucket!r}: "
                           f"{_describe_boto_error(e)}") from None


def presign_get(client: Any, bucket: str, key: str, expires_s: int) -> str:
    """A GET URL for the object valid ``expires_s`` seconds (clamped to SigV4's 7 days)."""
    expires = max(1, min(int(expires_s), MAX_PRESIGN_EXPIRY_S))
    return client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
    )


# --- download ----------------------------------------------------------------------------


def download_object(
    client: Any, bucket: str, key: str, dest: Path, *, max_bytes: int
) -> DownloadInfo:
    """Download s3://bucket/key to ``dest`` (temp file + rename), refusing objects > max_bytes."""
    where = f"s3://{bucket}/{key}"
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = e.response.get("Error", {}).get("Code")
        if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
            raise DownloadFailed(f"{where} does not exist") from None
        if status == 403 or code == "AccessDenied":
            raise DownloadFailed(f"access denied to {where}") from None
        raise DownloadFailed(f"could not read {where}: {_describe_boto_error(e)}") from None
    except BotoCoreError as e:
        raise DownloadFailed(f"could not read {where}: {_describe_boto_error(e)}") from None
    size = int(head.get("ContentLength", 0))
    too_big = f"{where} is larger than the {max_bytes / (1024 * 1024):g} MB limit"
    if size > max_bytes:
        raise DownloadFailed(f"{too_big} ({size} bytes)")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        client.download_file(bucket, key, str(tmp), Config=TRANSFER_CONFIG)
        got = tmp.stat().st_size
        if got > max_bytes:  # replaced by a bigger object since the HEAD
            raise DownloadFailed(too_big)
        os.replace(tmp, dest)
    except (BotoCoreError, ClientError, Boto3Error) as e:
        raise DownloadFailed(f"could not download {where}: {_describe_boto_error(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return DownloadInfo(path=dest, bytes=got, content_type=head.get("ContentType"))
