"""download() against a real local HTTP server."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from devtools.servers import (
    Html,
    LocalHTTPServer,
    LyingLength,
    Redirect,
    Reset,
    Serve,
    Stall,
    Status,
)
from handler.errors import DownloadFailed, InvalidInput
from handler.redact import install_log_redaction, register_secret
from handler.transfer.http import download

BODY = os.urandom(700 * 1024)  # > 2 progress steps of 256 KiB
FAST = {"allow_private": True, "timeout_s": 2.0, "backoff_s": 0.01}


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_download_ok_with_progress(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.route("/song.mp3", Serve(BODY, content_type="audio/mpeg"))
    calls: list[tuple[int, int | None]] = []
    dest = tmp_path / "in" / "song.mp3"
    info = download(url, dest, on_progress=lambda d, t: calls.append((d, t)), **FAST)
    assert info.path.read_bytes() == BODY
    assert (info.bytes, info.content_type) == (len(BODY), "audio/mpeg")
    assert calls[-1] == (len(BODY), len(BODY))
    assert 2 <= len(calls) <= len(BODY) // (256 * 1024) + 1
    assert all(b - a >= 256 * 1024 for (a, _), (b, _) in zip(calls, calls[1:-1], strict=False))
    assert _leftovers(tmp_path / "in") == ["song.mp3"]
    seen = http_server.requests[0]
    assert seen.headers.get("Accept-Encoding") == "identity"


def test_html_page_is_downloaded_with_its_content_type(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    url = http_server.route("/share", Html())
    info = download(url, tmp_path / "x", **FAST)
    assert info.content_type is not None and info.content_type.startswith("text/html")


def test_redirects_followed(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    target = http_server.route("/real.wav", Serve(BODY))
    http_server.route("/hop2", Redirect("/real.wav", 307))
    url = http_server.route("/hop1", Redirect(http_server.url("/hop2"), 301))
    assert download(url, tmp_path / "a.wav", **FAST).bytes == len(BODY)
    assert target.endswith("/real.wav") and http_server.hits("/real.wav") == 1


def test_too_many_redirects(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.route("/loop", Redirect("/loop"))
    with pytest.raises(DownloadFailed, match="more than 5 redirects"):
        download(url, tmp_path / "a", **FAST)
    assert http_server.hits("/loop") == 6


def test_redirect_to_metadata_refused(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    # Refused even with allow_private (the local test server itself needs it): every hop is
    # re-checked. (A public first hop can't be served from a test, so allow_private=False
    # hops are covered by test_netguard's address tests.)
    url = http_server.route("/r", Redirect("http://169.254.169.254/latest/meta-data/"))
    with pytest.raises(InvalidInput, match="link-local"):
        download(url, tmp_path / "a", **FAST)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://example.com/a.mp3"])
def test_redirect_to_other_scheme_refused(
    http_server: LocalHTTPServer, tmp_path: Path, target: str
) -> None:
    url = http_server.route("/r", Redirect(target))
    with pytest.raises(InvalidInput, match="only http"):
        download(url, tmp_path / "a", **FAST)


@pytest.mark.parametrize("code", [403, 404])
def test_client_errors_fail_at_once(
    http_server: LocalHTTPServer, tmp_path: Path, code: int
) -> None:
    url = http_server.route("/x.mp3", Status(code))
    with pytest.raises(DownloadFailed) as info:
        download(url + "?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA", tmp_path / "a", **FAST)
    assert str(info.value).startswith(f"DOWNLOAD_FAILED: HTTP {code} ")
    assert str(info.value).endswith(f"from {url}")
    assert "deadbeef" not in str(info.value)
    assert http_server.hits("/x.mp3") == 1


def test_server_errors_retried_then_fail(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.route("/x", Status(500))
    with pytest.raises(DownloadFailed, match="HTTP 500.*after 3 attempts"):
        download(url, tmp_path / "a", retries=2, **FAST)
    assert http_server.hits("/x") == 3
    assert _leftovers(tmp_path) == []


def test_server_errors_retried_then_succeed(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.route("/x", Status(503), Status(429), Serve(BODY))
    assert download(url, tmp_path / "a", **FAST).bytes == len(BODY)
    assert http_server.hits("/x") == 3


def test_stalled_server_times_out(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.route("/slow", Stall(BODY, delay_s=10, after_bytes=1000))
    started = time.monotonic()
    with pytest.raises(DownloadFailed, match="timed out"):
        download(url, tmp_path / "a", allow_private=True, timeout_s=0.5, backoff_s=0.01)
    assert time.monotonic() - started < 3
    assert _leftovers(tmp_path) == []


def test_stall_before_headers_times_out(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    # Stall(after_bytes=0) sends headers only; a server slow to even answer is covered by
    # the same read timeout.
    url = http_server.route("/slow", Stall(BODY, delay_s=10))
    with pytest.raises(DownloadFailed, match="timed out"):
        download(url, tmp_path / "a", allow_private=True, timeout_s=0.5, backoff_s=0.01)


def test_oversize_by_content_length(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.route("/big", Serve(BODY))
    with pytest.raises(DownloadFailed, match=r"larger than the 0.5 MB limit \(Content-Length"):
        download(url, tmp_path / "a", max_bytes=512 * 1024, **FAST)
    assert _leftovers(tmp_path) == []


def test_oversize_while_streaming(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.route("/big", Serve(BODY, length=False))
    with pytest.raises(DownloadFailed, match=r"larger than the 0.5 MB limit \(stopped after"):
        download(url, tmp_path / "a", max_bytes=512 * 1024, **FAST)
    assert http_server.hits("/big") == 1  # not retried
    assert _leftovers(tmp_path) == []


def test_body_without_content_length_ok(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    calls: list[tuple[int, int | None]] = []
    url = http_server.route("/x", Serve(BODY, length=False))
    info = download(url, tmp_path / "a", on_progress=lambda d, t: calls.append((d, t)), **FAST)
    assert info.bytes == len(BODY) and calls[-1] == (len(BODY), None)


def test_lying_content_length_retried_then_fails(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    url = http_server.route("/lie", LyingLength(BODY[:1000], declared=len(BODY)))
    with pytest.raises(DownloadFailed, match="incomplete body"):
        download(url, tmp_path / "a", retries=1, **FAST)
    assert http_server.hits("/lie") == 2
    assert _leftovers(tmp_path) == []


def test_reset_mid_body_retried(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.route("/r", Reset(BODY, after_bytes=300 * 1024), Serve(BODY))
    assert download(url, tmp_path / "a", **FAST).path.read_bytes() == BODY
    assert http_server.hits("/r") == 2


def test_reset_every_time_fails(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.route("/r", Reset(BODY, after_bytes=1000))
    with pytest.raises(DownloadFailed, match=r"(connection reset|incomplete body).*2 attempts"):
        download(url, tmp_path / "a", retries=1, **FAST)


def test_connection_refused_retried(tmp_path: Path) -> None:
    with pytest.raises(DownloadFailed, match="connection refused.*2 attempts"):
        download("http://127.0.0.1:1/a.mp3", tmp_path / "a", retries=1, **FAST)


def test_failed_download_keeps_existing_dest(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    dest = tmp_path / "a"
    dest.write_bytes(b"old")
    url = http_server.route("/lie", LyingLength(b"x" * 10, declared=100))
    with pytest.raises(DownloadFailed):
        download(url, dest, retries=0, **FAST)
    assert _leftovers(tmp_path) == ["a"] and dest.read_bytes() == b"old"


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.mp3", "s3://bucket/a.mp3"]
)
def test_other_schemes_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        download(url, tmp_path / "a", **FAST)


def test_loopback_needs_allow_private(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.route("/a", Serve(b"data"))
    with pytest.raises(InvalidInput, match="loopback"):
        download(url, tmp_path / "a", allow_private=False)
    assert http_server.hits("/a") == 0


def test_allow_private_defaults_to_env(
    http_server: LocalHTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = http_server.route("/a", Serve(b"data"))
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "true")
    assert download(url, tmp_path / "a").bytes == 4


def test_link_local_refused_even_with_allow_private(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="link-local"):
        download("http://169.254.169.254/latest/meta-data/iam/", tmp_path / "a",
                 allow_private=True)


def test_logs_never_contain_presigned_query(
    http_server: LocalHTTPServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    register_secret("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    install_log_redaction()
    install_log_redaction()  # idempotent
    url = http_server.route("/in.mp3", Status(502)) + (
        "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20250101"
        "&X-Amz-Signature=f00dfacecafe&X-Amz-Security-Token=tok3n"
    )
    log = logging.getLogger("handler.test")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(DownloadFailed) as info:
            download(url, tmp_path / "a", retries=1, **FAST)
        # What a careless caller might log: the raw URL, a secret, and a traceback.
        log.error("job failed for %s with key %s", url, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
        try:
            raise RuntimeError(f"boom {url}")
        except RuntimeError:
            log.exception("unexpected")
    handler_filters = [f for h in logging.getLogger().handlers for f in h.filters]
    assert sum(type(f).__name__ == "RedactingFilter" for f in handler_filters) >= 1
    text = caplog.text + str(info.value)
    assert "retrying" in caplog.text and "unexpected" in caplog.text
    for secret in ("f00dfacecafe", "tok3n", "AKIAEXAMPLE", "EXAMPLEKEY"):
        assert secret not in text
    assert "<redacted>" in caplog.text
