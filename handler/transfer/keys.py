"""Key and event rules: s3:// URIs, S3 event notifications, where outputs are written, and
which keys are the worker's own outputs (so an S3 trigger never loops)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import unquote_plus

from handler import config
from handler.errors import InvalidInput


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key). The key is taken verbatim (no URL decoding)."""
    if not isinstance(uri, str) or not uri.lower().startswith("s3://"):
        raise InvalidInput("expected an s3://bucket/key URI")
    bucket, _, key = uri[5:].partition("/")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):
        raise InvalidInput(f"invalid bucket name in S3 URI: {bucket[:64]!r}")
    if not key or key.endswith("/"):
        raise InvalidInput(f"S3 URI names no object: s3://{bucket}/{key}")
    return bucket, key



def parse_s3_event(payload: dict) -> list[tuple[str, str]]:
    """(bucket, key) of every ObjectCreated record in an AWS or MinIO S3 event notification.

    Keys arrive URL-encoded ('+' for space); anything that isn't such an event gives [].
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("Records"), list):
        return []
    top_event = payload.get("EventName")  # MinIO repeats the event name at the top level
    found: list[tuple[str, str]] = []
    for record in payload["Records"]:
        if not isinstance(record, dict) or not isinstance(record.get("s3"), dict):
            continue
        event = record.get("eventName") or top_event or ""
        if not isinstance(event, str) or "ObjectCreated" not in event:
            continue
        s3 = record["s3"]
        bucket = (s3.get("bucket") or {}).get("name")
        key = (s3.get("object") or {}).get("key")
        if isinstance(bucket, str) and bucket and isinstance(key, str) and key:
            pair = (bucket, unquote_plus(key))
            if pair not in found:
                found.append(pair)
    return found


def output_key(prefix: str, job_id: str, stem: str, ext: str) -> str:
    """``{prefix}/{job_id}/{stem}.{ext}``, without empty segments or doubled slashes."""
    parts = [prefix.strip("/"), job_id.strip("/"), f"{stem}.{ext.lstrip('.')}"]
    return "/".join(p for p in parts if p)


def event_output_key(
    input_key: str, stem: str, ext: str, output_prefix: str | None = None
) -> str:
    """Where an S3-triggered job writes a stem: beside its input, under ``output_prefix``.

    ``uploads/song.mp3`` -> ``uploads/separated/song/instrumental.mp3``.
    """
    output_prefix = (config.event_output_prefix() if output_prefix is None
                     else output_prefix.strip("/"))
    source = PurePosixPath(input_key)
    name = source.stem or source.name
    parent = "" if str(source.parent) == "." else str(source.parent)
    parts = [parent, output_prefix, name, f"{stem}.{ext.lstrip('.')}"]
    return "/".join(p for p in parts if p)


def is_folder_marker(key: str) -> bool:
    """A "folder" as S3 consoles create one: a key ending in ``/`` (an empty object)."""
    return key.endswith("/")


def is_own_output(key: str, output_prefix: str | None = None) -> bool:
    """True when ``key`` lies under an ``output_prefix`` folder, i.e. a job wrote it.

    S3 triggers fire on our own uploads too; skipping these keys prevents a loop.
    """
    output_prefix = (config.event_output_prefix() if output_prefix is None
                     else output_prefix.strip("/"))
    wanted = [s for s in output_prefix.split("/") if s]
    folders = [s for s in key.split("/") if s][:-1]
    if not wanted:
        return False
    n = len(wanted)
    return any(folders[i:i + n] == wanted for i in range(len(folders) - n + 1))
