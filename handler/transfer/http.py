"""HTTP transfers of caller-supplied URLs: download to disk and PUT to a presigned URL, both
through the address guard, with bounded size and time and one retry policy."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.client import IncompleteRead
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import DecodeError, NameResolutionError, ReadTimeoutError
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import IncompleteRead as Urllib3IncompleteRead

from handler import config
from handler.errors import DownloadFailed, InvalidInput, UploadFailed, WorkerError
from handler.redact import log_url, redact_url, scrub
from handler.transfer import integrity, netguard

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
CHUNK_BYTES = 64 * 1024
PROGRESS_EVERY_BYTES = 256 * 1024
PROGRESS_EVERY_S = 1.0  # a slow body still reports (elapsed time moves, the bar creeps)
CONNECT_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 30.0
# 408/429 are the client-error statuses that mean "try again later", not "you're wrong".
RETRY_STATUSES = frozenset({408, 429})

ProgressFn = Callable[[int, int | None], None]


@dataclass(frozen=True)
class DownloadInfo:
    path: Path
    bytes: int
    content_type: str | None


class Retryable(Exception):
    """A transient failure worth another attempt: ``reason`` and the URL it concerns.

    ``str()`` is for the caller (the URL redacted, its path kept); ``for_log()`` for logs
    (the path hashed: share links carry a token there).
    """

    def __init__(self, reason: str, url: str, preposition: str = "from", detail: str = "") -> None:
        self.reason, self.url, self.preposition = reason, url, preposition
        self.detail = f" ({detail})" if detail else ""
        super().__init__(f"{reason} {preposition} {redact_url(url)}{self.detail}")

    def for_log(self) -> str:
        return f"{self.reason} {self.preposition} {log_url(self.url)}{self.detail}"


class _Deadline:
    """The whole download's time limit. When it passes, the sockets the download opened are
    shut down, which ends any read at once (per-read timeouts restart with every byte)."""

    def __init__(self, seconds: float, shown: str) -> None:
        self.seconds = seconds
        self.shown = shown
        self.sockets: list[socket.socket] = []
        self.expired = threading.Event()
        self._started = time.monotonic()
        self._timer = threading.Timer(seconds, self._fire) if seconds > 0 else None
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        self.expired.set()
        for sock in list(self.sockets):
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def remaining(self) -> float:
        return float("inf") if self._timer is None else max(
            0.0, self.seconds - (time.monotonic() - self._started))

    def error(self) -> DownloadFailed:
        return DownloadFailed(
            f"the download did not finish within {self.seconds:g} s (DOWNLOAD_DEADLINE_S) "
            f"from {self.shown}"
        )

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def backoff_delay(attempt: int, base_s: float) -> float:
    """Delay before retry number ``attempt`` (0-based): base, 2*base, 4*base ... capped."""
    return min(MAX_BACKOFF_S, base_s * (2**attempt))


T = TypeVar("T")


def with_retries(
    attempt: Callable[[], T], *, retries: int, backoff_s: float, what: str,
    give_up: Callable[[str], WorkerError], before_retry: Callable[[float], None] | None = None,
) -> T:
    """Run ``attempt`` until it returns; a ``Retryable`` failure is tried again ``retries``
    times, waiting ``backoff_s`` doubled each time (``before_retry(delay)`` may refuse the
    wait), then ``give_up(reason)`` is raised."""
    attempts = retries + 1
    for n in range(attempts):
        try:
            return attempt()
        except Retryable as e:
            if n + 1 >= attempts:
                raise give_up(f"{e} (gave up after {attempts} attempts)") from None
            delay = backoff_delay(n, backoff_s)
            if before_retry is not None:
                before_retry(delay)
            log.warning("%s attempt %d/%d failed: %s; retrying in %.2fs",
                        what, n + 1, attempts, e.for_log(), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps (cause, context, urllib3 ``reason``, exception args)."""
    seen: set[int] = set()
    stack: list[object] = [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([e.__cause__, e.__context__, getattr(e, "reason", None), *e.args])


def is_read_timeout(exc: BaseException) -> bool:
    return any(
        isinstance(e, (ReadTimeoutError, requests.exceptions.ReadTimeout))
        for e in exception_chain(exc)
    )


def describe_network_error(exc: BaseException) -> str:
    """A short cause for a connection failure, without the URL that requests puts in str()."""
    kinds: list[tuple[type[BaseException] | tuple[type[BaseException], ...], str]] = [
        (NameResolutionError, "could not resolve host"),
        (ConnectionRefusedError, "connection refused"),
        (ConnectionResetError, "connection reset"),
        ((IncompleteRead, Urllib3IncompleteRead), "incomplete body"),
        (requests.exceptions.SSLError, "TLS error"),
        (requests.exceptions.ConnectTimeout, "connection timed out"),
    ]
    chain = list(exception_chain(exc))
    for kind, text in kinds:
        if any(isinstance(e, kind) for e in chain):
            return text
    return f"connection error ({type(exc).__name__})"


def download(
    url: str,
    dest: Path,
    *,
    max_bytes: int | None = None,
    timeout_s: float | None = None,
    allow_private: bool | None = None,
    on_progress: ProgressFn | None = None,
    retries: int = 3,
    backoff_s: float | None = None,
    deadline_s: float | None = None,
    min_rate_kbps: float | None = None,
) -> DownloadInfo:
    """Stream ``url`` into ``dest``; on failure ``dest`` is left untouched.

    ``retries`` is the number of extra attempts after the first for transient failures
    (connection errors, resets, 5xx/408/429, truncated bodies), waiting ``backoff_s``
    (default: env RETRY_BACKOFF_S) doubled each time. Unsafe URLs raise InvalidInput;
    4xx, oversize bodies, stalls (no byte for ``timeout_s``), bodies that do not match their
    Content-Encoding, a body slower than ``min_rate_kbps`` on average and the whole download
    running past ``deadline_s`` raise DownloadFailed at once.
    """
    max_bytes = config.max_download_bytes() if max_bytes is None else max_bytes
    timeout_s = config.download_timeout_s() if timeout_s is None else timeout_s
    allow_private = config.allow_private_urls() if allow_private is None else allow_private
    backoff_s = config.retry_backoff_s() if backoff_s is None else backoff_s
    deadline_s = config.download_deadline_s() if deadline_s is None else deadline_s
    min_rate = config.download_min_rate_kbps() if min_rate_kbps is None else min_rate_kbps
    shown = redact_url(url)

    netguard.check_url(url, allow_private=allow_private)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as dest, so the final rename is atomic; hidden, so nothing picks it up.
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    session = netguard.guarded_session(allow_private=allow_private)
    deadline = _Deadline(deadline_s, shown)
    body = _BodyLimits(max_bytes, timeout_s, min_rate * 1024, on_progress)

    def attempt() -> tuple[int, str | None]:
        try:
            return _attempt(session, url, tmp, timeout_s, allow_private, body)
        finally:
            if deadline.expired.is_set():  # whatever the cut-off read raised
                raise deadline.error() from None

    def before_retry(delay: float) -> None:
        if delay >= deadline.remaining():
            raise deadline.error() from None

    try:
        with netguard.watch_sockets(deadline.sockets):
            size, content_type = with_retries(
                attempt, retries=retries, backoff_s=backoff_s, what="download",
                give_up=DownloadFailed, before_retry=before_retry)
        os.replace(tmp, dest)
        log.info("downloaded %d bytes from %s", size, log_url(url))
        return DownloadInfo(path=dest, bytes=size, content_type=content_type)
    finally:
        deadline.cancel()
        session.close()
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class _BodyLimits:
    max_bytes: int
    timeout_s: float  # also the grace before the average rate is judged
    min_rate_bps: float  # 0: no minimum
    on_progress: ProgressFn | None


def _attempt(
    session: requests.Session,
    url: str,
    tmp: Path,
    timeout_s: float,
    allow_private: bool,
    body: _BodyLimits,
) -> tuple[int, str | None]:
    """One attempt, redirects included. Transient failures raise Retryable."""
    final_url = url
    try:
        resp, final_url = _open(session, url, timeout_s, allow_private)
        with resp:
            return _save_body(resp, final_url, tmp, body)
    except requests.exceptions.ConnectTimeout:
        raise Retryable("connection timed out", final_url, "to") from None
    except DecodeError:
        # The body is not what its Content-Encoding says: the same bytes would come again.
        raise DownloadFailed(
            f"the body does not match its Content-Encoding header from {redact_url(final_url)}"
        ) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ReadTimeout, Urllib3Error) as e:
        if is_read_timeout(e):
            # A stalled server would most likely stall again: fail now, don't multiply the wait.
            raise DownloadFailed(
                f"timed out: no data for {timeout_s:g}s from {redact_url(final_url)}"
            ) from None
        raise Retryable(describe_network_error(e), final_url) from None
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema):
        raise InvalidInput(f"malformed URL: {redact_url(final_url)}") from None
    except requests.exceptions.ContentDecodingError:
        raise DownloadFailed(
            f"the body does not match its Content-Encoding header from {redact_url(final_url)}"
        ) from None
    except requests.exceptions.RequestException as e:
        raise Retryable(type(e).__name__, final_url) from None


def _open(
    session: requests.Session, url: str, timeout_s: float, allow_private: bool
) -> tuple[requests.Response, str]:
    """GET ``url``, following up to MAX_REDIRECTS redirects, each hop re-checked."""
    timeout = (min(CONNECT_TIMEOUT_S, timeout_s), timeout_s)
    headers = {"Accept-Encoding": "identity"}  # sizes and Content-Length are the file's own
    for _ in range(MAX_REDIRECTS + 1):
        resp = session.get(url, stream=True, timeout=timeout, headers=headers,
                           allow_redirects=False)
        location = session.get_redirect_target(resp)
        if not location:
            return resp, url
        resp.close()
        url = urljoin(url, location)
        netguard.check_url(url, allow_private=allow_private)
    raise DownloadFailed(f"more than {MAX_REDIRECTS} redirects, last to {redact_url(url)}")


# An S3-style XML error body (S3, GCS, R2, MinIO, Azure): its Code and Message say why a
# presigned URL was refused (e.g. "AccessDenied: Request has expired"). Nothing else of the
# body is shown: it may echo the signature (SignatureProvided, StringToSign).
_XML_ERROR = re.compile(
    r"<Code>\s*([A-Za-z0-9.]{1,64})\s*</Code>\s*<Message>([^<]{0,400})</Message>"
)
_ERROR_BODY_BYTES = 4096


def _error_detail(resp: requests.Response) -> str:
    try:
        head = resp.raw.read(_ERROR_BODY_BYTES, decode_content=True) or b""
    except Exception:  # noqa: BLE001 - the status alone still explains the failure
        return ""
    m = _XML_ERROR.search(head.decode("utf-8", "replace"))
    if not m:
        return ""
    message = " ".join(m[2].split())[:160]
    return scrub(f"{m[1]}: {message}" if message else m[1])


def _content_length(resp: requests.Response) -> int | None:
    try:
        value = int(resp.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):g}"


def _save_body(
    resp: requests.Response, url: str, tmp: Path, limits: _BodyLimits
) -> tuple[int, str | None]:
    shown = redact_url(url)
    max_bytes, on_progress = limits.max_bytes, limits.on_progress
    status = resp.status_code
    if status >= 300:
        what = " ".join(filter(None, [f"HTTP {status}", resp.reason]))
        detail = _error_detail(resp)
        if status >= 500 or status in RETRY_STATUSES:
            raise Retryable(what, url, detail=detail)
        raise DownloadFailed(f"{what} from {shown}" + (f" ({detail})" if detail else ""))

    declared = _content_length(resp)
    # With a Content-Encoding the header counts encoded bytes; only the decoded size is ours.
    encoded = resp.headers.get("Content-Encoding", "identity").lower() != "identity"
    if declared is not None and not encoded and declared > max_bytes:
        raise DownloadFailed(
            f"file is larger than the {_mb(max_bytes)} MB limit "
            f"(Content-Length: {declared} bytes) at {shown}"
        )
    total = None if encoded else declared
    done = reported = 0
    started = last_report = time.monotonic()
    with tmp.open("wb") as out:
        # read1: whatever one network read brings (iter_content waits for a whole chunk, so a
        # trickling server was never measured, nor reported, nor stopped).
        while chunk := resp.raw.read1(CHUNK_BYTES, decode_content=True):
            done += len(chunk)
            if done > max_bytes:
                raise DownloadFailed(
                    f"download is larger than the {_mb(max_bytes)} MB limit "
                    f"(stopped after {done} bytes) from {shown}"
                )
            out.write(chunk)
            now = time.monotonic()
            elapsed = now - started
            if limits.min_rate_bps and elapsed >= limits.timeout_s:
                rate = done / elapsed
                if rate < limits.min_rate_bps:
                    raise DownloadFailed(
                        f"too slow: {rate / 1024:.2g} KB/s on average over {elapsed:.1f} s; "
                        f"the minimum is {limits.min_rate_bps / 1024:g} KB/s "
                        f"(DOWNLOAD_MIN_RATE_KBPS) from {shown}"
                    )
            if on_progress and (done - reported >= PROGRESS_EVERY_BYTES
                                or now - last_report >= PROGRESS_EVERY_S):
                reported, last_report = done, now
                on_progress(done, total)
    if total is not None and done != total:
        raise Retryable(f"incomplete body: got {done} of {total} bytes", url)
    if done == 0:
        raise DownloadFailed(f"empty response body (HTTP {status}) from {shown}")
    if on_progress and done != reported:
        on_progress(done, total)
    return done, resp.headers.get("Content-Type")


def put_presigned(
    url: str,
    path: Path,
    content_type: str,
    *,
    retries: int = 3,
    timeout_s: float | None = None,
    backoff_s: float | None = None,
) -> None:
    """HTTP PUT ``path`` to a caller's presigned URL (streamed from disk).

    Connection errors, 5xx, 408 and 429 are retried ``retries`` times with backoff; other
    non-2xx statuses raise UploadFailed at once, and so does a 2xx whose digest headers say
    the server stored something other than the file.
    """
    timeout_s = config.upload_timeout_s() if timeout_s is None else timeout_s
    backoff_s = config.retry_backoff_s() if backoff_s is None else backoff_s
    allow_private = config.allow_private_urls()
    shown = redact_url(url)
    try:
        netguard.check_url(url, allow_private=allow_private)
    except DownloadFailed as e:  # DNS failure: it is this upload that failed
        raise UploadFailed(e.message) from None
    path = Path(path)
    size = path.stat().st_size
    sent_md5 = integrity.file_md5(path)
    headers = {"Content-Type": content_type, "Content-Length": str(size)}
    if (urlsplit(url).hostname or "").endswith(".blob.core.windows.net"):
        headers["x-ms-blob-type"] = "BlockBlob"  # Azure SAS URLs refuse a PUT without it

    def attempt() -> None:
        try:
            with path.open("rb") as body:
                resp = session.put(url, data=body, headers=headers,
                                   timeout=(min(10.0, timeout_s), timeout_s),
                                   allow_redirects=False)
            with resp:
                status, reason, answer = resp.status_code, resp.reason, resp.headers
        except requests.exceptions.Timeout:
            raise Retryable(f"timed out after {timeout_s:g}s", url, "talking to") from None
        except requests.exceptions.RequestException as e:
            raise Retryable(describe_network_error(e), url) from None
        if 200 <= status < 300:
            # A 2xx that stored something else (or nothing) is no success.
            wrong = integrity.mismatch(answer, sent_md5)
            if wrong:
                raise UploadFailed(f"PUT to presigned URL {shown}: {wrong}")
            log.info("uploaded %d bytes to %s", size, log_url(url))
            return
        problem = " ".join(filter(None, [f"HTTP {status}", reason]))
        if status < 500 and status not in RETRY_STATUSES:
            raise UploadFailed(f"PUT to presigned URL failed: {problem} from {shown}")
        raise Retryable(problem, url)

    with netguard.guarded_session(allow_private=allow_private) as session:
        with_retries(attempt, retries=retries, backoff_s=backoff_s, what="upload",
                     give_up=lambda why: UploadFailed(f"PUT to presigned URL failed: {why}"))
