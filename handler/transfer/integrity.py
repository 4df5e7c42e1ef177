"""Did a 2xx upload store what was sent? Compare the digests a server returns with our MD5.

Some servers answer 200 to a PUT without storing the body (a misrouted presigned URL, a
proxy that swallows it); where the response carries an MD5 of what was stored, a mismatch
is caught here. Servers whose ETag is not an MD5 are left alone: multipart ETags
(``<md5>-<parts>``), Azure's ``0x8D...``, and S3's ETags of SSE-KMS / SSE-C objects (an
opaque value of the same length as an MD5, so they are recognised by their headers).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

_HEX_MD5 = re.compile(r"[0-9a-fA-F]{32}")
_OPAQUE_SSE = ("aws:kms", "aws:kms:dsse")


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as f:
        while block := f.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def stored_md5(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """(where it came from, hex MD5) of what the server says it stored, or None if it
    says nothing usable. ``headers`` must be case-insensitive (requests' are)."""
    for name, value in _base64_md5s(headers):
        return name, value
    etag = (headers.get("ETag") or "").strip()
    if not etag or etag.startswith("W/"):
        return None
    etag = etag.strip('"')
    if not _HEX_MD5.fullmatch(etag):
        return None
    sse = (headers.get("x-amz-server-side-encryption") or "").lower()
    if sse in _OPAQUE_SSE or headers.get("x-amz-server-side-encryption-customer-algorithm"):
        return None
    if headers.get("x-goog-encryption-kms-key-name") or headers.get(
            "x-goog-encryption-algorithm"):
        return None
    return "ETag", etag.lower()


def _base64_md5s(headers: Mapping[str, str]):
    # GCS: x-goog-hash: crc32c=...,md5=<base64>; Azure (Put Blob): Content-MD5: <base64>.
    for part in (headers.get("x-goog-hash") or "").split(","):
        key, _, value = part.strip().partition("=")
        if key == "md5":
            hexed = _b64_to_hex(value)
            if hexed:
                yield "x-goog-hash", hexed
    hexed = _b64_to_hex(headers.get("Content-MD5") or "")
    if hexed:
        yield "Content-MD5", hexed


def _b64_to_hex(value: str) -> str | None:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 16 else None


def mismatch(headers: Mapping[str, str], sent_md5: str) -> str | None:
    """Why the response shows the body was not stored as sent, or None."""
    stored = stored_md5(headers)
    if stored is None or stored[1] == sent_md5:
        return None
    source, value = stored
    return (f"the server answered success but its {source} ({value}) is not the MD5 of the "
            f"uploaded file ({sent_md5}): the file was not stored as sent")
