"""`clipdex run DIR`, the README's main job, as a real process: it indexes the folder, keeps watching it,
and serves HTTP and MCP from the same process; SIGTERM stops both halves cleanly."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from clipdex import synthetic
from tests.brokers import free_port
from tests.conftest import clipdex_command, tiny_env

pytestmark = pytest.mark.integration


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    url: str
    root: Path
    log: Path


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    root = tmp_path / "images"
    synthetic.write_folder(root, 6, seed=3, size=64)
    port = free_port()
    log = tmp_path / "run.log"
    env = tiny_env(tmp_path / "data") | {"CLIPDEX_REFRESH_INTERVAL_MS": "50", "CLIPDEX_WATCH_SETTLE_MS": "100"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*clipdex_command(), "run", str(root), "--port", str(port)], env=env, stdout=out, stderr=out
        )
    try:
        yield Running(proc, f"http://127.0.0.1:{port}", root, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _poll(what: str, check: object, running: Running, timeout_s: float = 60) -> httpx.Response:
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            pytest.fail(f"clipdex run exited with {running.proc.returncode}:\n{running.log.read_text()[-3000:]}")
        try:
            last = check()
            if last is not None and last.status_code == 200:
                return last
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what} (last: {last and last.text}):\n{running.log.read_text()[-3000:]}")


def test_run_indexes_watches_and_serves_http_and_mcp(running: Running) -> None:
    health = _poll("health with 6 items", lambda: _health_with(running.url, 6), running)
    assert health.json()["items"] == 6

    shutil.copy(next(running.root.glob("*.jpg")), running.root / "dropped later.jpg")
    item = _poll("the dropped file", lambda: httpx.get(f"{running.url}/items/folder:images/dropped later.jpg"), running)
    assert item.json()["uri"].endswith("dropped later.jpg")

    hits = httpx.get(f"{running.url}/search", params={"query": "a red circle", "top_k": 10}).json()["hits"]
    assert {h["id"] for h in hits} >= {"folder:images/dropped later.jpg"}  # 7 items, top 10: all of them

    hits = asyncio.run(_find_similar_over_mcp(running.url, "folder:images/dropped later.jpg"))
    assert len(hits) == 3
    assert "folder:images/dropped later.jpg" not in {h["id"] for h in hits}
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)  # its source file has the same pixels

    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=30) == 0, running.log.read_text()[-3000:]


async def _find_similar_over_mcp(url: str, item_id: str) -> list[dict[str, Any]]:
    async with (
        httpx2.AsyncClient(timeout=30) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client,
    ):
        result = await client.call_tool("find_similar", {"item_id": item_id, "top_k": 3})
        assert not result.is_error, result.content
        assert result.structured_content is not None
        hits: list[dict[str, Any]] = result.structured_content["hits"]
        return hits


def _health_with(url: str, items: int) -> httpx.Response | None:
    response = httpx.get(f"{url}/health", timeout=2)
    return response if response.status_code == 200 and response.json()["items"] >= items else None


def test_run_refuses_a_missing_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [*clipdex_command(), "run", str(tmp_path / "nope")],
        env=tiny_env(tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "not a directory" in result.stderr


def test_run_refuses_a_public_bind_without_a_token(tmp_path: Path) -> None:
    result = subprocess.run(
        [*clipdex_command(), "run", str(tmp_path), "--host", "0.0.0.0"],
        env=tiny_env(tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "CLIPDEX_API_TOKEN" in result.stderr
