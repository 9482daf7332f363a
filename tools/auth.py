"""Who may talk to the server: the bind rule, the bearer token, Host/Origin checks, and the body limit.

- The server binds 127.0.0.1 by default. Binding any other address needs CLIPDEX_API_TOKEN, or an explicit
  `--insecure`; otherwise it refuses to start and says so (`check_bind`).
- With a token set, every path but the open ones (`/health`, `/openapi.json`, `/docs`, and the web UI's
  static files, which hold no data) needs `Authorization: Bearer <token>`: /mcp and the HTTP API alike.
  `/health` stays open for load balancers and probes; it tells no more than the index size.
- DNS-rebinding protection: the Host header must name the bound address, localhost, or one of
  CLIPDEX_ALLOWED_HOSTS (421 otherwise), and an Origin header, when a browser sends one, must match too
  (403 otherwise).
- Cross-site requests: a browser marks a request that a page of another site makes (an <img>, a form, a
  fetch) `Sec-Fetch-Site: cross-site`, Origin or not; they get 403, but for `/health` and for following a
  link to the web UI's page (a top-level GET navigation, which the other site cannot read back: a shared
  search link opened from a chat or a mail). Without it, any web page could load a loopback server's
  thumbnails as images and learn from what loads which files are indexed.
- Request bodies over CLIPDEX_MAX_UPLOAD_BYTES get 413, from the Content-Length header before anything is
  read, or as soon as a streamed body passes the limit.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from mcp.server.transport_security import TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.config import Settings
from shared.errors import ConfigError

OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs"})

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings, *, insecure: bool) -> None:
    """Refuse to serve a non-loopback address without a token, unless the caller said --insecure."""
    if is_loopback(settings.host) or settings.api_token is not None or insecure:
        return
    raise ConfigError(
        f"refusing to listen on {settings.host}: anyone who can reach it could search the index. Set a bearer "
        "token in CLIPDEX_API_TOKEN (clients then send 'Authorization: Bearer <token>'), bind 127.0.0.1, or "
        "pass --insecure if the network is trusted."
    )


@dataclass(frozen=True)
class HostPolicy:
    """The Host and Origin header values the server answers to."""

    hosts: tuple[str, ...]  # "name:port", "name:*" (any port) or "name" (default port)
    origins: tuple[str, ...]  # "http://name:port", "http://name:*", "http://name"

    @classmethod
    def for_bind(cls, bind_host: str, extra: Iterable[str] = ()) -> HostPolicy:
        names = list(_LOOPBACK_NAMES)
        host = bind_host.lower()
        if _is_wildcard(host):
            names.append(socket.gethostname().lower())
        elif host not in ("localhost",):
            names.append(f"[{host}]" if ":" in host else host)
        hosts: list[str] = []
        for name in names:
            hosts += [name, f"{name}:*"]
        for value in extra:
            hosts += [value] if _has_port(value) else [value, f"{value}:*"]
        origins = [f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")]
        return cls(tuple(dict.fromkeys(hosts)), tuple(dict.fromkeys(origins)))

    def host_ok(self, host: str | None) -> bool:
        return host is not None and _matches(host.lower(), self.hosts)

    def origin_ok(self, origin: str | None) -> bool:
        return origin is None or _matches(origin.lower(), self.origins)

    def transport_security(self) -> TransportSecuritySettings:
        """The same rules for the MCP SDK's own check on /mcp."""
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=True, allowed_hosts=list(self.hosts), allowed_origins=list(self.origins)
        )


def _matches(value: str, allowed: Sequence[str]) -> bool:
    for pattern in allowed:
        if pattern.endswith(":*"):
            if value.startswith(pattern[:-1]) and value[len(pattern) - 1 :].isdigit():
                return True
        elif value == pattern:
            return True
    return False


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "[::]", "")


def _has_port(value: str) -> bool:
    tail = value.rsplit("]", 1)[-1] if value.startswith("[") else value
    return ":" in tail and tail.rsplit(":", 1)[1].isdigit()


class BodyTooLarge(Exception):
    """Raised from a request's receive() when its body passes the limit."""


class Gate:
    """ASGI middleware in front of everything: Host/Origin checks, the bearer token, the body limit."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        policy: HostPolicy,
        token: str | None,
        max_body: int,
        open_paths: Collection[str] = OPEN_PATHS,
        pages: Collection[str] = (),
    ) -> None:
        self.app = app
        self.policy = policy
        self.token = token.encode() if token else None
        self.max_body = max_body
        self.open_paths = open_paths
        self.pages = pages  # what a link from another site may open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope["path"]
        if path != "/health":
            if not self.policy.host_ok(headers.get("host")):
                await _error(
                    send,
                    421,
                    f"Host header {headers.get('host')!r} is not served here; use the server's "
                    "address or localhost, or add the name to CLIPDEX_ALLOWED_HOSTS",
                )
                return
            if not self.policy.origin_ok(headers.get("origin")):
                await _error(
                    send,
                    403,
                    f"requests from origin {headers.get('origin')!r} are refused "
                    "(DNS-rebinding protection); add its host to CLIPDEX_ALLOWED_HOSTS if it is yours",
                )
                return
            if headers.get("sec-fetch-site", "").lower() == "cross-site" and not self._followed_link(scope, headers):
                await _error(
                    send,
                    403,
                    "cross-site browser requests are refused (Sec-Fetch-Site: cross-site): a page of another "
                    "site may not use this server; open the page from the server's own address instead",
                )
                return
        if self.token is not None and path not in self.open_paths and not self._authorized(headers):
            await _error(
                send,
                401,
                "missing or wrong bearer token: send the header 'Authorization: Bearer <CLIPDEX_API_TOKEN>'",
                [(b"www-authenticate", b'Bearer realm="clipdex"')],
            )
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _error(send, 413, self._too_large(int(declared)))
            return
        await self._limited(scope, receive, send)

    def _followed_link(self, scope: Scope, headers: Headers) -> bool:
        """A top-level navigation to a page: its response goes to a new document, never to the other site."""
        return (
            scope["method"] == "GET"
            and scope["path"] in self.pages
            and headers.get("sec-fetch-mode", "").lower() == "navigate"
            and headers.get("sec-fetch-dest", "document").lower() == "document"
        )

    def _authorized(self, headers: Headers) -> bool:
        assert self.token is not None
        scheme, _, value = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _error(send, 413, self._too_large(received))

    def _too_large(self, size: int) -> str:
        return (
            f"request body of {size:,}+ bytes is over the limit of {self.max_body:,} bytes "
            "(CLIPDEX_MAX_UPLOAD_BYTES); send a smaller image"
        )


async def _error(send: Send, status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
