"""SSRF guard for caller-supplied URLs.

Two layers:

* :func:`check_url` validates a URL up front (scheme, host, every resolved address) so a bad
  URL fails fast with a clear INVALID_INPUT.
* :func:`guarded_session` returns a ``requests.Session`` whose connections re-resolve the host
  at connect time, re-check the addresses and connect only to an address that passed. What
  was validated is what is connected to, which defeats DNS rebinding (a host that resolves
  to a public address for the check and to 169.254.169.254 for the connect). TLS still
  verifies the certificate against the hostname, not the IP.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError

from handler.errors import DownloadFailed, InvalidInput
from handler.redact import redact_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES = ("http", "https")

# Refused even with allow_private: link-local is where cloud metadata services live, and a
# worker's instance credentials must never be reachable through a caller's URL.
_ALWAYS_BLOCKED = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # IPv4 link-local, incl. 169.254.169.254 (AWS/GCP/Azure/RunPod)
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "168.63.129.16/32",  # Azure WireServer
    )
)
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# IPv6 ranges that embed an IPv4 address a gateway would forward to.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPAT = ipaddress.ip_network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPAT and int(ip) > 1):  # not :: or ::1
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_reason(ip: IPAddress, *, allow_private: bool) -> str | None:
    """Why connecting to ``ip`` is refused, or None when it is allowed."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:  # "fe80::1%eth0": scoped addresses are link-local by nature
            return "a link-local address"
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return blocked_reason(embedded, allow_private=allow_private)
    if any(ip in net for net in _ALWAYS_BLOCKED) or ip.is_link_local:
        return "a link-local / cloud metadata address"
    if allow_private:
        return None
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private or (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT):
        return "a private address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:  # deprecated fec0::/10
        return "a private address"
    if ip.is_reserved or not ip.is_global:
        return "a reserved address"
    return None


def _parse_ip(address: str) -> IPAddress:
    return ipaddress.ip_address(address)


def resolve(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (TCP), in resolver order. gaierror propagates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_url(url: str, *, allow_private: bool, resolve_host: bool = True) -> None:
    """Raise InvalidInput unless ``url`` is http(s) to a host whose addresses are all allowed.

    DNS failure raises DownloadFailed (the URL may be fine; the name just does not resolve).
    ``resolve_host=False`` skips DNS: only the scheme, metadata host names and IP literals
    are checked (for parsing input offline; check again with DNS before connecting).
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidInput(f"malformed URL: {shown}") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise InvalidInput(f"only http(s) URLs are accepted, got {scheme or 'no'} scheme")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise InvalidInput(f"URL has no host: {shown}")
    if host in _METADATA_HOSTS:
        raise InvalidInput(f"URL points to a cloud metadata service: {shown}")
    if not resolve_host:
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            return
        reason = blocked_reason(literal, allow_private=allow_private)
        if reason:
            raise InvalidInput(f"URL host is {reason}: {shown}")
        return
    try:
        addresses = resolve(host, port or (443 if scheme == "https" else 80))
    except (socket.gaierror, UnicodeError):
        raise DownloadFailed(f"could not resolve host {host!r} of {shown}") from None
    if not addresses:
        raise DownloadFailed(f"host {host!r} has no addresses")
    for address in addresses:
        reason = blocked_reason(_parse_ip(address), allow_private=allow_private)
        if reason:
            raise InvalidInput(f"URL host {host!r} resolves to {reason}: {shown}")


# --- connection-time pinning -------------------------------------------------------------

_watch = threading.local()


@contextmanager
def watch_sockets(sink: list[socket.socket]) -> Iterator[None]:
    """Sockets this thread's guarded sessions connect, while inside, are appended to ``sink``:
    a watchdog can shut them down to end a read that per-read timeouts never would (a
    server trickling one byte a second, headers included)."""
    previous = getattr(_watch, "sink", None)
    _watch.sink = sink
    try:
        yield
    finally:
        _watch.sink = previous



class _GuardedConnectionMixin:
    """Resolve, check and connect to the checked address in one step (see module doc)."""

    _allow_private = False
    _dns_host: str
    port: int

    def _new_conn(self) -> socket.socket:
        host = self._dns_host
        try:
            addresses = resolve(host, self.port)
        except socket.gaierror as e:
            raise NameResolutionError(host, self, e) from e  # type: ignore[arg-type]
        for address in addresses:
            reason = blocked_reason(_parse_ip(address), allow_private=self._allow_private)
            if reason:
                # Not an OSError: urllib3/requests let it through unwrapped and unretried.
                raise InvalidInput(f"host {host.rstrip('.')!r} resolves to {reason}")
        last: Exception | None = None
        for address in addresses:
            # create_connection() gets a numeric address, so nothing is resolved again;
            # TLS (SNI, certificate check) reads .host, which is restored before it runs.
            self._dns_host = address
            try:
                sock: socket.socket = super()._new_conn()  # type: ignore[misc]
                sink = getattr(_watch, "sink", None)
                if sink is not None:
                    sink.append(sock)
                return sock
            except ConnectTimeoutError as e:  # incl. NewConnectionError: try the next one
                last = e
            finally:
                self._dns_host = host
        assert last is not None
        raise last


@functools.cache
def _pool_classes(allow_private: bool) -> dict[str, type[HTTPConnectionPool]]:
    attrs = {"_allow_private": allow_private}
    conn = type("GuardedHTTPConnection", (_GuardedConnectionMixin, HTTPConnection), attrs)
    tls = type("GuardedHTTPSConnection", (_GuardedConnectionMixin, HTTPSConnection), attrs)
    pool = type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": conn})
    tls_pool = type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": tls})
    return {"http": pool, "https": tls_pool}


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, *, allow_private: bool, **kwargs: Any) -> None:
        self._allow_private = allow_private  # read by init_poolmanager, called by __init__
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _pool_classes(self._allow_private)


def guarded_session(*, allow_private: bool) -> requests.Session:
    """A session that only ever connects to addresses :func:`blocked_reason` allows.

    It ignores proxy env vars and .netrc (``trust_env=False``): a proxy would resolve the
    host itself, out of reach of the check, and .netrc could leak credentials to any host.
    Callers pass ``allow_redirects=False`` and re-run :func:`check_url` on every hop, so a
    redirect to a refused address fails with a clear INVALID_INPUT message.
    """
    session = requests.Session()
    session.trust_env = False
    adapter = _GuardedAdapter(allow_private=allow_private)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
