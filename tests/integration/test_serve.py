"""`clipdex serve` as a real process on a loopback port, with a token: MCP over streamable HTTP, the HTTP
API, the gate, and a store written by another process (this one) while the server runs."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import numpy as np
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from indexer.compaction import compact
from shared.config import Settings
from shared.embedder import Embedder
from shared.sqlite.index import IndexParams
from shared.sqlite.store import SqliteStore
from tests.brokers import free_port, stop_process
from tests.conftest import clipdex_command, tiny_env, tiny_settings_for
from tests.sample_store import COLOURS, Sample, add_items, delete_items, fill_store, png_bytes, unit_vectors

pytestmark = pytest.mark.integration

TOKEN = "integration-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MAX_UPLOAD = 256 * 1024


@dataclass
class Served:
    url: str
    catalog: Sample
    settings: Settings  # the same data dir as the server's, for writing to its store from this process
    log: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_embedder: Embedder) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("serve")
    data, root = base / "data", base / "images"
    with SqliteStore(data / "clipdex.sqlite3") as store:
        catalog = fill_store(store, tiny_embedder, root)
    port = free_port()
    env = tiny_env(data) | {
        "CLIPDEX_API_TOKEN": TOKEN,
        "CLIPDEX_ALLOWED_ROOTS": str(root),
        "CLIPDEX_REFRESH_INTERVAL_MS": "50",
        "CLIPDEX_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
    }
    log = base / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*clipdex_command(), "serve", "--port", str(port)], env=env, stdout=out, stderr=out)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        yield Served(url, catalog, tiny_settings_for(data, allowed_roots=[str(root)]), log)
    finally:
        stop_process(proc, timeout_s=15)
    assert proc.returncode == 0, log.read_text()[-3000:]


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"clipdex serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"clipdex serve did not become healthy:\n{log.read_text()[-3000:]}")


@asynccontextmanager
async def mcp_client(url: str, token: str = TOKEN) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=30) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client,
    ):
        yield client


@pytest.fixture
async def api(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=30) as client:
        yield client


# -- MCP over streamable HTTP -----------------------------------------------------------------------------


async def test_each_tool_over_streamable_http(served: Served) -> None:
    catalog = served.catalog
    async with mcp_client(served.url) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert names == {"search", "find_similar", "get_item", "index_status"}
        search = await client.call_tool("search", {"query": "a red square", "top_k": 4})
        assert len(search.structured_content["hits"]) == 4  # type: ignore[index]
        by_id = await client.call_tool("find_similar", {"item_id": catalog.image_ids["red"], "top_k": 100})
        ids = [h["id"] for h in by_id.structured_content["hits"]]  # type: ignore[index]
        assert catalog.image_ids["red"] not in ids
        by_path = await client.call_tool("find_similar", {"path": "blue.png", "top_k": 1, "include_images": True})
        assert by_path.structured_content["hits"][0]["id"] == catalog.image_ids["blue"]  # type: ignore[index]
        assert any(c.type == "image" for c in by_path.content)
        item = await client.call_tool("get_item", {"item_id": catalog.failed_id})
        assert item.structured_content["status"] == "failed"  # type: ignore[index]
        status = await client.call_tool("index_status", {})
        assert status.structured_content["model"]["name"] == "clipdex-tiny"  # type: ignore[index]
        bad = await client.call_tool("search", {"query": "x", "top_k": 0})
        assert bad.is_error and "top_k" in bad.content[0].text  # type: ignore[union-attr]


async def test_mcp_needs_the_token(served: Served) -> None:
    init = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {}}
    headers = {"accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(base_url=served.url) as raw:
        assert (await raw.post("/mcp", json=init, headers=headers)).status_code == 401
        wrong = await raw.post("/mcp", json=init, headers={**headers, "authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = await raw.post("/mcp", json=init, headers={**headers, **AUTH})
        assert right.status_code != 401


async def test_a_foreign_host_header_is_refused(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url, headers=AUTH) as raw:
        evil = {"host": "attacker.example:80"}
        assert (await raw.get("/search", params={"query": "x"}, headers=evil)).status_code == 421
        assert (await raw.post("/mcp", json={}, headers=evil)).status_code == 421
        assert (await raw.get("/search", params={"query": "x"}, headers={"host": "localhost"})).status_code == 200


# -- the HTTP API -----------------------------------------------------------------------------------------


async def test_every_http_endpoint_and_its_bad_inputs(served: Served, api: httpx.AsyncClient) -> None:
    catalog = served.catalog
    assert (await api.get("/search", params={"query": "red"})).status_code == 200
    async with httpx.AsyncClient(base_url=served.url) as anonymous:
        assert (await anonymous.get("/search", params={"query": "red"})).status_code == 401
        assert (await anonymous.get("/health")).json()["status"] == "ok"
    for top_k in ("0", "1000"):
        response = await api.get("/search", params={"query": "red", "top_k": top_k})
        assert response.status_code == 400 and "top_k" in response.json()["error"]
    assert (await api.get("/search", params={"query": ""})).status_code == 400
    similar = await api.get("/similar", params={"id": catalog.image_ids["green"], "top_k": 3})
    assert len(similar.json()["hits"]) == 3
    assert (await api.get("/similar", params={"id": "kafka:unknown"})).status_code == 404
    upload = await api.post("/similar", files={"file": ("g.png", png_bytes(COLOURS["green"]), "image/png")})
    assert upload.json()["hits"][0]["id"] == catalog.image_ids["green"]
    huge = await api.post("/similar", files={"file": ("huge.png", b"\0" * (MAX_UPLOAD + 1), "image/png")})
    assert huge.status_code == 413 and "CLIPDEX_MAX_UPLOAD_BYTES" in huge.json()["error"]
    text = await api.post("/similar", files={"file": ("a.txt", b"just text", "text/plain")})
    assert text.status_code == 422 and "not an image" in text.json()["error"]
    assert (await api.get(f"/items/{catalog.image_ids['red']}")).json()["metadata"]["colour"] == "red"
    assert (await api.get("/items/kafka:unknown")).status_code == 404
    thumb = await api.get(f"/items/{catalog.image_ids['red']}/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert (await api.get("/items/kafka:unknown/thumbnail")).status_code == 404
    metrics = (await api.get("/metrics")).text
    assert 'clipdex_search_requests_total{transport="http",kind="text",outcome="ok"}' in metrics
    assert (await api.get("/openapi.json")).json()["paths"]["/search"]
    assert (await api.get("/health")).json()["items"] >= catalog.searchable


# -- following a store that another process writes --------------------------------------------------------


async def test_a_new_item_appears_without_a_restart(
    served: Served, api: httpx.AsyncClient, tiny_embedder: Embedder
) -> None:
    query = "a lighthouse at dusk, painted in oils"
    vector = tiny_embedder.encode_text(query).vector
    with SqliteStore(served.settings.db_path) as store:  # this test process is the "indexer"
        add_items(store, ["kafka:fresh"], vector[None, :], {"new": True})
        assert await _first_hit_when(api, query, lambda first: first == "kafka:fresh") == "kafka:fresh"
        delete_items(store, ["kafka:fresh"])
        first = (await api.get("/search", params={"query": query, "top_k": 1})).json()["hits"][0]["id"]
        assert first != "kafka:fresh"  # gone at once: results are checked against the store


async def _first_hit_when(api: httpx.AsyncClient, query: str, done: Callable[[str | None], bool]) -> str | None:
    deadline = time.monotonic() + 10
    first: str | None = None
    while time.monotonic() < deadline:
        hits = (await api.get("/search", params={"query": query, "top_k": 1})).json()["hits"]
        first = hits[0]["id"] if hits else None
        if done(first):
            break
        await asyncio.sleep(0.05)
    return first


async def test_concurrent_searches_while_items_are_added_deleted_and_compacted(
    served: Served, api: httpx.AsyncClient
) -> None:
    settings = served.settings
    params = IndexParams.from_settings(settings)
    rng = np.random.default_rng(7)
    deleted_at: dict[str, float] = {}
    stop = threading.Event()
    errors: list[BaseException] = []
    compactions: list[int] = []
    generation_before = (await api.get("/health")).json()["generation"]

    with SqliteStore(settings.db_path) as store:
        doomed = served.catalog.synthetic_ids[:10]
        delete_items(store, doomed)
        deleted_at.update({i: time.monotonic() for i in doomed})
        # enough live items that every search must return a full top_k, during the swaps too
        add_items(store, [f"kafka:base-{j}" for j in range(150)], unit_vectors(rng, 150, 32))
        assert await eventually(lambda: _full_page(api))

        def writer() -> None:
            batch = 0
            while not stop.is_set() or batch < 3:
                ids = [f"kafka:live-{batch}-{j}" for j in range(10)]
                add_items(store, ids, unit_vectors(rng, len(ids), 32))
                delete_items(store, ids[:3])
                now = time.monotonic()
                deleted_at.update({i: now for i in ids[:3]})
                batch += 1
                time.sleep(0.01)

        def compactor() -> None:
            while not stop.is_set() or len(compactions) < 2:
                compactions.append(compact(store, params, 32, store.index_dir).generation)
                time.sleep(0.02)

        def guarded(fn: Any) -> Any:
            def run() -> None:
                try:
                    fn()
                except BaseException as exc:  # reported below, in the test's thread
                    errors.append(exc)

            return run

        threads = [threading.Thread(target=guarded(fn)) for fn in (writer, compactor)]
        for thread in threads:
            thread.start()

        async def one(i: int) -> tuple[float, httpx.Response]:
            sent = time.monotonic()
            return sent, await api.get("/search", params={"query": f"concurrent query {i}", "top_k": 100})

        try:
            results = await asyncio.gather(*(one(i) for i in range(50)))
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
    assert not errors, errors
    assert len(compactions) >= 2
    for sent, response in results:
        assert response.status_code == 200, response.text
        hits = response.json()["hits"]
        assert len(hits) == 100
        stale = [h["id"] for h in hits if h["id"] in deleted_at and deleted_at[h["id"]] < sent]
        assert not stale, f"deleted items in results: {stale}"
    assert await eventually(lambda: _health(api, "generation", compactions[-1]))
    assert compactions[-1] > generation_before


async def _full_page(api: httpx.AsyncClient) -> bool:
    response = await api.get("/search", params={"query": "probe", "top_k": 100})
    return len(response.json()["hits"]) == 100


async def _health(api: httpx.AsyncClient, key: str, at_least: int) -> bool:
    return bool((await api.get("/health")).json()[key] >= at_least)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if await check():
            return True
        await asyncio.sleep(0.05)
    return await check()
