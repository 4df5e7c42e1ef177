"""URL safety checks: schemes, hosts, address classes, and connect-time pinning."""

from __future__ import annotations

import ipaddress

import pytest

from devtools.servers import LocalHTTPServer, Serve
from handler.errors import DownloadFailed, InvalidInput
from handler.transfer import netguard


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/song.mp3",
        "s3://bucket/song.mp3",
        "gopher://127.0.0.1:70/",
        "javascript:alert(1)",
        "song.mp3",
    ],
)
def test_non_http_schemes_refused_even_when_private_allowed(url: str) -> None:
    with pytest.raises(InvalidInput, match="only http"):
        netguard.check_url(url, allow_private=True)


def test_missing_host_refused() -> None:
    with pytest.raises(InvalidInput, match="no host"):
        netguard.check_url("http:///path", allow_private=True)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://localhost:8080/a.wav",
        "http://[::1]/",
        "http://10.1.2.3/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://100.64.0.1/",  # CGNAT
        "http://[fd12:3456::1]/",  # ULA
        "http://[fec0::1]/",  # site-local (deprecated)
        "http://0.0.0.0/",
        "http://224.0.0.1/",  # multicast
        "http://240.0.0.1/",  # reserved
        "http://[::ffff:127.0.0.1]/",  # IPv4-mapped loopback
        "http://[::ffff:10.0.0.1]/",
        "http://2130706433/",  # 127.0.0.1 as a decimal integer
        "http://0x7f.1/",
    ],
)
def test_private_addresses_refused_unless_allowed(url: str) -> None:
    with pytest.raises(InvalidInput, match="resolves to"):
        netguard.check_url(url, allow_private=False)
    netguard.check_url(url, allow_private=True)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.1.1/",
        "http://[fe80::1]/",
        "http://[fd00:ec2::254]/",
        "http://100.100.100.200/",
        "http://[::ffff:169.254.169.254]/",  # IPv4-mapped
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://METADATA.google.internal./",
    ],
)
def test_link_local_and_metadata_refused_even_when_private_allowed(url: str) -> None:
    with pytest.raises(InvalidInput):
        netguard.check_url(url, allow_private=True)


def test_public_address_allowed() -> None:
    netguard.check_url("https://93.184.215.14/song.mp3?X-Amz-Signature=abc", allow_private=False)
    netguard.check_url("http://[2606:4700::6810:84e5]:8080/", allow_private=False)


def test_static_check_without_dns() -> None:
    netguard.check_url("https://no-such-host.invalid/a.mp3", allow_private=False,
                       resolve_host=False)
    for url in ("http://127.0.0.1/", "http://[::ffff:10.0.0.1]/"):
        with pytest.raises(InvalidInput):
            netguard.check_url(url, allow_private=False, resolve_host=False)
    with pytest.raises(InvalidInput):
        netguard.check_url("http://169.254.169.254/", allow_private=True, resolve_host=False)
    with pytest.raises(InvalidInput):
        netguard.check_url("ftp://example.com/", allow_private=True, resolve_host=False)


def test_dns_failure_is_download_failed() -> None:
    with pytest.raises(DownloadFailed, match="could not resolve"):
        netguard.check_url("https://no-such-host.invalid/a.mp3", allow_private=False)


def test_error_message_hides_query_string() -> None:
    with pytest.raises(InvalidInput) as info:
        netguard.check_url("http://127.0.0.1/a?X-Amz-Signature=s3cr3t", allow_private=False)
    assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize(
    ("address", "private_ok"),
    [
        ("8.8.8.8", True),
        ("127.0.0.1", True),
        ("::ffff:8.8.8.8", True),
        ("169.254.169.254", False),
        ("fe80::1%1", False),
        ("2002:a9fe:a9fe::1", False),  # 6to4 wrapping 169.254.169.254
        ("fec0::1", True),  # deprecated site-local: private, so allowed here
    ],
)
def test_blocked_reason_with_private_allowed(address: str, private_ok: bool) -> None:
    reason = netguard.blocked_reason(ipaddress.ip_address(address), allow_private=True)
    assert (reason is None) is private_ok


def test_guarded_session_refuses_at_connect_time(http_server: LocalHTTPServer) -> None:
    # No check_url beforehand: the connection itself re-checks what it connects to, which
    # is what defeats DNS rebinding between the check and the connect.
    url = http_server.route("/a", Serve(b"hello"))
    with netguard.guarded_session(allow_private=False) as session, pytest.raises(InvalidInput):
        session.get(url, timeout=2)
    assert http_server.hits("/a") == 0
    with netguard.guarded_session(allow_private=True) as session:
        assert session.get(url, timeout=2).content == b"hello"


def test_guarded_session_connects_by_hostname(http_server: LocalHTTPServer) -> None:
    # "localhost" may resolve to ::1 first while the server only listens on 127.0.0.1.
    url = http_server.route("/a", Serve(b"hi")).replace("127.0.0.1", "localhost")
    with netguard.guarded_session(allow_private=True) as session:
        assert session.get(url, timeout=2).content == b"hi"
