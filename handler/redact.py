"""Keep presigned URLs and credentials out of logs and error messages.

A presigned URL's query string *is* a credential (anyone holding it can read or write the
object until it expires), so it is never logged; neither are registered secret values.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from urllib.parse import SplitResult, urlsplit, urlunsplit

REDACTED = "<redacted>"

# Secrets shorter than this are not registered: scrubbing a short common word ("test")
# from every log line would mangle logs without protecting anything.
_MIN_SECRET_LEN = 8

_MAX_SHOWN = 300

_secrets: set[str] = set()
_lock = threading.Lock()

# The query of any http(s) URL: presigned URLs carry their signature there.
_URL_QUERY = re.compile(r"(?i)(\bhttps?://[^\s?#\"'<>]+)\?[^\s#\"'<>]*")
# Signature-bearing parameters that show up without a scheme, e.g. urllib3's
# "Max retries exceeded with url: /key?X-Amz-Signature=..." (S3 v2/v4, CloudFront, GCS, SAS).
_SIGNED_PARAM = re.compile(
    r"(?i)\b(X-Amz-[A-Za-z-]+|X-Goog-[A-Za-z-]+|Signature|AWSAccessKeyId|Expires|Policy|"
    r"Key-Pair-Id|GoogleAccessId|sig|se|sp|sv|token|access_token)=[^&\s\"'<>]+"
)

# botocore's DEBUG log of a SigV4 signature ("Signature:\n<hex>"); for a presigned URL (the
# worker's result URLs) that signature is the URL's whole secret.
_SIGNATURE_LINE = re.compile(r"\b(Signature:\s*)[0-9A-Fa-f]{32,}")

# Secret-named fields in dict/JSON text, e.g. the SDK printing a job's ``s3Config`` before our
# code has seen (and registered) it.
_SECRET_FIELD = re.compile(
    r"(?i)(['\"]?(?:accessSecret|accessId|secret_access_key|aws_secret_access_key|"
    r"BUCKET_SECRET_ACCESS_KEY|password|api_key|authorization)['\"]?\s*[:=]\s*)(['\"])[^'\"]*\2"
)


def register_secret(value: str | None) -> None:
    """Scrub ``value`` from every log record from now on (credentials from s3Config / env)."""
    if value and len(value) >= _MIN_SECRET_LEN:
        with _lock:
            _secrets.add(value)


def _without_userinfo(url: str) -> tuple[SplitResult, str] | None:
    """(the URL's parts, its host[:port] without userinfo), or None if it does not parse."""
    try:
        parts = urlsplit(str(url))
        host = parts.hostname or ""
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return parts, (f"{host}:{parts.port}" if parts.port is not None else host)
    except ValueError:
        return None


def redact_url(url: str) -> str:
    """``url`` without userinfo, query string and fragment: safe to log or show a caller."""
    split = _without_userinfo(url)
    if split is None:  # e.g. an invalid port: show nothing rather than something secret
        return REDACTED
    parts, netloc = split
    shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    # Callers control the path: keep error messages and log lines bounded.
    return shown if len(shown) <= _MAX_SHOWN else shown[: _MAX_SHOWN - 3] + "..."


def log_url(url: str) -> str:
    """``url`` for a log line: scheme, host, port and a short hash of the path.

    Share links carry their token in the path (``/s/<token>/file``), so even a redacted URL
    is a credential there; the hash still tells two URLs apart when reading logs.
    """
    split = _without_userinfo(url)
    if split is None:
        return REDACTED
    parts, netloc = split
    base = f"{parts.scheme}://{netloc}"
    if parts.path in ("", "/"):
        return base + "/"
    digest = hashlib.sha256(parts.path.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{base} (path sha256:{digest})"


def scrub(text: str) -> str:
    """``text`` with URL query strings, signature parameters and registered secrets removed."""
    text = _URL_QUERY.sub(rf"\1?{REDACTED}", text)
    text = _SIGNED_PARAM.sub(rf"\1={REDACTED}", text)
    text = _SIGNATURE_LINE.sub(rf"\1{REDACTED}", text)
    text = _SECRET_FIELD.sub(rf"\1\2{REDACTED}\2", text)
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)  # longest first: overlaps
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message (and formatted traceback) through :func:`scrub`."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # bad format args: logging reports those itself
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        # Exception text (e.g. requests' "Max retries exceeded with url: ...?X-Amz-...")
        # is formatted lazily by handlers; format it now, scrubbed, and they reuse it.
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def install_log_redaction() -> None:
    """Attach the redacting filter to every handler of the root logger (idempotent).

    Call it after logging is configured: handlers added later are not covered.
    """
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


class _ScrubbingStream:
    """A text stream that scrubs every write: the runpod SDK logs with ``print``, bypassing
    logging filters, and at its DEBUG level it prints every job input and streamed item."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(scrub(text))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def install_stream_redaction() -> None:
    """Scrub ``sys.stdout`` and ``sys.stderr`` (idempotent); the worker calls it at start."""
    import sys

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, _ScrubbingStream):
            setattr(sys, name, _ScrubbingStream(stream))
