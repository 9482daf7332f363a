"""How clipdex connects out to fetch an image URL: to checked addresses only, within one deadline.

    httpx.Client ─▶ GuardedTransport ─▶ httpcore pool ─▶ GuardedBackend.connect_tcp(host, port)
                                                          resolve host once ─▶ check each address
                                                          ─▶ connect to the checked address itself
                                                          ─▶ every read, write and TLS handshake
                                                             times out at the one deadline

The name is resolved once per connection, and the connection goes to the address that passed the check,
never to a second lookup (a name that answers a public address to the check and 169.254.169.254 to the
connection is DNS rebinding). TLS still verifies the certificate against the host name. Loopback,
private, link-local, multicast and other non-global addresses are refused unless the allowlist names that
address itself (`127.0.0.1:8080`). Proxies from the environment are not used: through a proxy, the
address that is finally reached could not be checked.

httpx's timeouts bound each read, so a server that sends one byte a second holds a download for as long
as it likes; here the remaining time to one deadline bounds every socket operation.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import httpcore
import httpx

from shared.config import parse_url_host
from shared.errors import FetchFailed, HostNotAllowed

logger = logging.getLogger(__name__)

DEFAULT_PORTS = frozenset({80, 443})

Resolve = Callable[[str, int], list[str]]  # host, port -> addresses; raises OSError (socket.gaierror)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def system_resolve(host: str, port: int) -> list[str]:
    """The addresses of `host` from the system resolver, in its order of preference."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# -- the allowlist ----------------------------------------------------------------------------------------------


class Allowlist:
    """CLIPDEX_ALLOWED_URL_HOSTS: which host and port a URL may name, and which internal addresses may
    be connected to (those written as addresses in the list)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.rules = frozenset(parse_url_host(e) for e in entries)
        self.addresses = frozenset((_address(h), p) for h, p in self.rules if _is_address(h))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def has_host(self, host: str) -> bool:
        return any(h == host for h, _ in self.rules)

    def allows(self, host: str, port: int) -> bool:
        """A URL naming `host:port`: the entry `host:port`, or `host` and port 80 or 443."""
        return (host, port) in self.rules or ((host, None) in self.rules and port in DEFAULT_PORTS)

    def allows_address(self, address: IPAddress, port: int) -> bool:
        """Connecting to `address`: any global unicast address, and an internal one that the list names."""
        if _is_public(address):
            return True
        return (address, port) in self.addresses or ((address, None) in self.addresses and port in DEFAULT_PORTS)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address(text: str) -> IPAddress:
    address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone: fe80::1%eth0
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 (Python 3.11 calls it global)
    return address


def _is_public(address: IPAddress) -> bool:
    """Global unicast: not loopback, private, link-local (cloud metadata), shared (CGNAT), reserved,
    unspecified (0.0.0.0 reaches the local host) or multicast."""
    return address.is_global and not address.is_multicast


# -- the network backend ------------------------------------------------------------------------------------------


class GuardedBackend(httpcore.NetworkBackend):
    def __init__(self, allow: Allowlist, deadline: float, resolve: Resolve) -> None:
        self._allow = allow
        self._deadline = deadline
        self._resolve = resolve
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        failure: httpcore.ConnectError | None = None
        for address in self.checked_addresses(host, port):
            try:
                stream = self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=_remaining(self._deadline, timeout, httpcore.ConnectTimeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:  # try the host's next address, as a browser would
                failure = exc
                continue
            return DeadlineStream(stream, self._deadline)
        assert failure is not None
        raise failure

    def checked_addresses(self, host: str, port: int) -> list[IPAddress]:
        """The addresses of `host` that may be connected to; HostNotAllowed when there are none."""
        if _is_address(host):
            found = [_address(host)]
        else:
            try:
                found = [_address(a) for a in self._resolve(host, port)]
            except (OSError, UnicodeError) as exc:
                logger.info("cannot resolve %s: %s", host, exc)
                raise FetchFailed(f"cannot resolve the host name {host!r}") from exc
        allowed = [a for a in found if self._allow.allows_address(a, port)]
        if not allowed:
            logger.warning("refused to connect to %s:%d: it resolves to %s", host, port, ", ".join(map(str, found)))
            raise HostNotAllowed(
                f"{host!r} resolves to an internal address (loopback, private, link-local or multicast), which is "
                "refused; to fetch from it anyway, name the address in CLIPDEX_ALLOWED_URL_HOSTS"
            )
        return allowed

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("image URLs are not fetched over unix sockets")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose every operation times out at the deadline at the latest."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _remaining(self._deadline, timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _remaining(self._deadline, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        remaining = _remaining(self._deadline, timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, remaining), self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


def _remaining(deadline: float, timeout: float | None, expired: type[httpcore.TimeoutException]) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the download deadline has passed")
    return left if timeout is None else min(timeout, left)


# -- the httpx transport ------------------------------------------------------------------------------------------


class GuardedTransport(httpx.BaseTransport):
    """An httpx transport over an httpcore pool whose connections are made by GuardedBackend."""

    def __init__(
        self,
        allow: Allowlist,
        deadline: float,
        resolve: Resolve = system_resolve,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(),
            network_backend=GuardedBackend(allow, deadline, resolve),
            max_connections=4,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = self._pool.handle_request(core_request)
        assert isinstance(response.stream, Iterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


class _Body(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


@contextmanager
def _as_httpx_errors() -> Iterator[None]:
    """httpcore's errors as httpx's namesakes (ReadTimeout, ConnectError, RemoteProtocolError...), as
    httpx's own transport raises them."""
    try:
        yield
    except httpcore.TimeoutException as exc:
        raise getattr(httpx, type(exc).__name__, httpx.TimeoutException)(str(exc)) from exc
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, httpcore.ProxyError) as exc:
        raise getattr(httpx, type(exc).__name__, httpx.TransportError)(str(exc)) from exc
