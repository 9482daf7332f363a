"""serve_http, the entry point `clipdex serve` and `clipdex run` share: it listens, answers, and stops."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.core import Core, build_core
from shared.embedder import Embedder
from shared.errors import ConfigError
from tests.conftest import tiny_settings_for
from tests.sample_store import Sample, fill_data_dir
from tools.app import serve_http


@pytest.fixture
def core(tmp_path: Path, tiny_embedder: Embedder) -> Iterator[Core]:
    settings = tiny_settings_for(tmp_path / "data")
    core = build_core(settings, embedder=tiny_embedder)
    yield core
    core.reader.close()  # not core.close(): the embedder is the session's


async def test_serve_http_listens_until_stopped(core: Core, tmp_path: Path, tiny_embedder: Embedder) -> None:
    watched = tmp_path / "watched"
    catalog: Sample = fill_data_dir(core.settings, tiny_embedder, watched)
    core.vectors.refresh()
    # the watched folder is not in CLIPDEX_ALLOWED_ROOTS: thumbnails work through extra_roots
    stop, ready = asyncio.Event(), asyncio.Event()
    port = _free_port()
    settings = core.settings.model_copy(update={"port": port})
    server = asyncio.create_task(serve_http(core, settings, stop, ready=ready, extra_roots=[watched]))
    await asyncio.wait_for(ready.wait(), 10)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/health")).json()["items"] == catalog.searchable
        thumb = await client.get(f"/items/{catalog.image_ids['red']}/thumbnail")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    stop.set()
    await asyncio.wait_for(server, 10)
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/health")


async def test_serve_http_says_when_the_port_is_taken(core: Core) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = core.settings.model_copy(update={"port": taken.getsockname()[1]})
        with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1.*another server using the port"):
            await serve_http(core, settings, asyncio.Event())


async def test_serve_http_refuses_a_public_address_without_a_token(core: Core) -> None:
    settings = core.settings.model_copy(update={"host": "0.0.0.0"})
    with pytest.raises(ConfigError, match="CLIPDEX_API_TOKEN"):
        await serve_http(core, settings, asyncio.Event())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
