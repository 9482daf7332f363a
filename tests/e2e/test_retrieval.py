"""The whole product, with the trained shapes model, through real processes.

200 images are dropped into a folder watched by `clipdex watch`; 200 more are published as catalog events
to a real broker, consumed by `clipdex consume`; `clipdex serve` answers an MCP client over streamable
HTTP from the same store. Then a text search and a find-similar must find the right images, and after
every red circle is deleted (files removed, delete events sent) no search names one.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from clipdex import synthetic
from tests.brokers import free_port, publish, stop_process
from tests.conftest import SHAPES_MODELS, clipdex_command, exported, model_cache

pytestmark = pytest.mark.e2e

MODELS = SHAPES_MODELS
PER_SOURCE = 200
TIMEOUT_S = 180  # generous: two indexers and a server share two cores; latency is the benchmarks' job


@dataclass(frozen=True)
class Image:
    id: str
    path: Path
    colour: str
    shape: str


def _images(root: Path, seed: int, id_of: Any) -> list[Image]:
    """PER_SOURCE images: a few certain red circles and blue squares, the rest drawn at random."""
    written = synthetic.write_folder(root, 8, seed, size=128, colours=["red"], shapes=["circle"])
    written += synthetic.write_folder(root, 8, seed + 1, size=128, colours=["blue"], shapes=["square"], start=8)
    written += synthetic.write_folder(root, PER_SOURCE - 16, seed + 2, size=128, start=16)
    return [Image(id_of(w.path), w.path, w.colour, w.shape) for w in written]


def _key(image: Image) -> bytes:
    """The catalog's own id, sent as the message key; clipdex stores it as kafka:<id>."""
    return image.id.removeprefix("kafka:").encode()


@dataclass
class Deployment:
    folder: list[Image]
    catalog: list[Image]
    url: str
    bootstrap: str
    topic: str
    logs: Path

    @property
    def by_id(self) -> dict[str, Image]:
        return {i.id: i for i in [*self.folder, *self.catalog]}

    def tail_logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-2500:]}" for log in sorted(self.logs.glob("*.log")))


def _start(name: str, args: list[str], env: dict[str, str], logs: Path, stack: ExitStack) -> subprocess.Popen[bytes]:
    with open(logs / f"{name}.log", "wb") as out:
        proc = subprocess.Popen([*clipdex_command(), *args], env=env, stdout=out, stderr=out)

    stack.callback(stop_process, proc, 20)
    return proc


@pytest.fixture
def deployment(tmp_path: Path, kafka_bootstrap: str, kafka_topic: str) -> Iterator[Deployment]:
    exported("clipdex-shapes", str(MODELS / "clipdex-shapes.safetensors"), MODELS)  # once, before 3 processes
    watched, catalog_dir, logs = tmp_path / "watched", tmp_path / "catalog", tmp_path / "logs"
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPDEX_")} | {
        "CLIPDEX_DATA_DIR": str(tmp_path / "data"),
        "CLIPDEX_MODEL": "clipdex-shapes",
        "CLIPDEX_PRETRAINED": str(MODELS / "clipdex-shapes.safetensors"),
        "CLIPDEX_MODEL_CONFIGS": str(MODELS),
        "CLIPDEX_DEVICE": "cpu",
        "CLIPDEX_MODEL_CACHE_DIR": str(model_cache()),
        "CLIPDEX_ALLOWED_ROOTS": str(catalog_dir),
        "CLIPDEX_REFRESH_INTERVAL_MS": "100",
        "CLIPDEX_WATCH_SETTLE_MS": "200",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        # three processes on two cores: OpenMP threads that spin while they wait starve each other
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    folder = _images(watched, seed=11, id_of=lambda p: f"folder:watched/{p.name}")
    catalog = _images(catalog_dir, seed=23, id_of=lambda p: f"kafka:sku-{p.stem}")
    port = free_port()
    with ExitStack() as stack:
        procs = [
            _start("watch", ["watch", str(watched)], env, logs, stack),
            _start(
                "consume", ["consume", "--bootstrap-servers", kafka_bootstrap, "--topic", kafka_topic], env, logs, stack
            ),
            _start("serve", ["serve", "--port", str(port)], env, logs, stack),
        ]
        events = [
            (_key(i), json.dumps({"op": "upsert", "uri": str(i.path), "metadata": {"colour": i.colour}}).encode())
            for i in catalog
        ]
        asyncio.run(publish(kafka_bootstrap, kafka_topic, events))
        deployment = Deployment(folder, catalog, f"http://127.0.0.1:{port}", kafka_bootstrap, kafka_topic, logs)
        yield deployment
        for proc in procs:
            assert proc.poll() is None, f"a clipdex process died:\n{deployment.tail_logs()}"


@asynccontextmanager
async def mcp(url: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(timeout=60) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client,
    ):
        yield client


async def _call(client: Client, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def _wait_for(what: str, deployment: Deployment, check: Any) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    async with httpx.AsyncClient(timeout=5) as http:
        while True:  # the server loads its model first
            try:
                if (await http.get(f"{deployment.url}/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server never became healthy\n{deployment.tail_logs()}")
            await asyncio.sleep(0.2)
    async with mcp(deployment.url) as client:
        while time.monotonic() < deadline:
            value = await check(client)
            if value:
                return value
            await asyncio.sleep(0.5)
    pytest.fail(f"timed out after {TIMEOUT_S} s waiting for {what}\n{deployment.tail_logs()}")


async def test_text_search_find_similar_and_deletes(deployment: Deployment) -> None:
    everything = 2 * PER_SOURCE

    async def all_indexed(client: Client) -> bool:
        status = await _call(client, "index_status", {})
        return bool(status["items"] >= everything)

    await _wait_for(f"{everything} items", deployment, all_indexed)

    async with mcp(deployment.url) as client:
        hits = (await _call(client, "search", {"query": "a red circle", "top_k": 5}))["hits"]
        found = [deployment.by_id[h["id"]] for h in hits]
        assert [(i.colour, i.shape) for i in found] == [("red", "circle")] * 5, found

        blue_square = next(i for i in deployment.folder if (i.colour, i.shape) == ("blue", "square"))
        hits = (await _call(client, "find_similar", {"item_id": blue_square.id, "top_k": 5}))["hits"]
        found = [deployment.by_id[h["id"]] for h in hits]
        assert [(i.colour, i.shape) for i in found] == [("blue", "square")] * 5, found
        assert blue_square.id not in {h["id"] for h in hits}

    red_circles = {i.id for i in deployment.by_id.values() if (i.colour, i.shape) == ("red", "circle")}
    assert len(red_circles) >= 16
    for image in deployment.folder:
        if image.id in red_circles:
            image.path.unlink()
    deletes = [(_key(i), json.dumps({"op": "delete"}).encode()) for i in deployment.catalog if i.id in red_circles]
    await publish(deployment.bootstrap, deployment.topic, deletes)

    async def no_red_circles(client: Client) -> list[dict[str, Any]] | None:
        hits: list[dict[str, Any]] = (await _call(client, "search", {"query": "a red circle", "top_k": 50}))["hits"]
        status = await _call(client, "index_status", {})
        gone = status["items"] == everything - len(red_circles)
        return hits if gone and not red_circles & {h["id"] for h in hits} else None

    hits = await _wait_for("the red circles to leave the index", deployment, no_red_circles)
    assert len(hits) == 50  # the rest of the catalog is still there
