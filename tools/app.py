"""The read side's composition root: one Starlette app serving the HTTP API, the web UI (/) and MCP (/mcp) on
one port.

    build_app(core, settings) -> Starlette        the app, for uvicorn or an ASGI test client
    serve_http(core, settings, stop, ...)          run it with uvicorn until `stop` is set

`clipdex serve` builds its own Core; `clipdex run` shares the Core's model with its folder indexer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route

from shared.config import Settings
from shared.core import Core
from shared.errors import ConfigError
from shared.fetch import FetchPolicy
from tools import ui
from tools.auth import OPEN_PATHS, Gate, HostPolicy, check_bind, is_loopback
from tools.http_api import HttpApi, http_error
from tools.mcp_server import build_mcp_server, package_version
from tools.metrics import Metrics
from tools.openapi import Docs, openapi_spec
from tools.queries import Queries

logger = logging.getLogger(__name__)

_GRACEFUL_SHUTDOWN_S = 5


def build_app(
    core: Core,
    settings: Settings,
    *,
    extra_roots: Sequence[Path] = (),
    metrics: Metrics | None = None,
) -> Starlette:
    """The HTTP API, the web UI (/) and the MCP streamable-HTTP endpoint (/mcp) over `core`, behind the Gate (Host and
    Origin checks, bearer token, body limit). `extra_roots` are directories that item paths, thumbnails
    and find_similar(path=...) may read besides CLIPDEX_ALLOWED_ROOTS (e.g. the watched folder)."""
    metrics = metrics or Metrics()
    queries = Queries(core, FetchPolicy.from_settings(settings, extra_roots), metrics)
    hosts = HostPolicy.for_bind(settings.host, settings.allowed_hosts)
    mcp = build_mcp_server(queries)
    mcp_app = mcp.streamable_http_app(
        streamable_http_path="/mcp",
        max_request_body_size=settings.max_upload_bytes,
        transport_security=hosts.transport_security(),
        host=settings.host,
    )
    session_manager = mcp.session_manager
    token = settings.api_token.get_secret_value() if settings.api_token else None
    docs = Docs(openapi_spec(package_version(), token=token is not None))
    routes: list[BaseRoute] = [
        *HttpApi(queries, metrics).routes(),
        Route("/openapi.json", docs.openapi, methods=["GET"]),
        Route("/docs", docs.page, methods=["GET"]),
        *ui.WebUi(token_required=token is not None).routes(),
        *mcp_app.routes,
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with session_manager.run():
            yield

    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(
                Gate,
                policy=hosts,
                token=token,
                max_body=settings.max_upload_bytes,
                open_paths=OPEN_PATHS | ui.PATHS,
                pages={"/"},
            )
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.queries = queries
    app.state.metrics = metrics
    return app


async def serve_http(
    core: Core,
    settings: Settings,
    stop: asyncio.Event,
    *,
    insecure: bool = False,
    ready: asyncio.Event | None = None,
    extra_roots: Sequence[Path] = (),
    metrics: Metrics | None = None,
) -> None:
    """Serve HTTP + MCP on settings.host:settings.port until `stop` is set (the caller owns signals).

    Raises ConfigError before serving when the address is not allowed (see tools.auth.check_bind) or
    cannot be bound. Sets `ready` once the socket accepts connections.
    """
    check_bind(settings, insecure=insecure)
    if not is_loopback(settings.host) and settings.api_token is None:
        logger.warning("serving %s WITHOUT a token (--insecure): anyone who can reach it can search", settings.host)
    app = build_app(core, settings, extra_roots=extra_roots, metrics=metrics)
    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=port,
        log_config=None,
        access_log=settings.log_level == "DEBUG",
        lifespan="on",
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        server_header=False,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await first_of(task, server.listening.wait(), stop.wait())
        if server.listening.is_set():
            logger.info(
                "serving HTTP on http://%s:%d (web UI at /, MCP at /mcp, API docs at /docs)", _show(settings.host), port
            )
            if ready is not None:
                ready.set()
            await first_of(task, stop.wait())
    finally:
        server.should_exit = True
        with _startup_exit():
            await task
        sock.close()


async def first_of(task: asyncio.Task[None], *waits: Coroutine[Any, Any, Any]) -> None:
    """Wait until the task ends or one of the other awaitables finishes; cancel the others."""
    others = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait({task, *others}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for other in others:
            other.cancel()


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers (whoever set up `stop` handles SIGINT and SIGTERM), and
    with an event for "the socket accepts connections"."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self.listening.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def _startup_exit() -> Iterator[None]:
    try:
        yield
    except SystemExit as exc:  # uvicorn exits the process when its startup fails; make it an error
        raise ConfigError("the HTTP server failed to start; see the log above") from exc


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket, or a ConfigError saying why not (e.g. the port is taken)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {_show(host)}:{port}: {exc.strerror or exc}. Is another server using the port? "
            "Choose another with --port (CLIPDEX_PORT) or --host (CLIPDEX_HOST)."
        ) from exc
    sock.set_inheritable(True)
    return sock


def _show(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
