"""`clipdex mcp` as a subprocess, driven over stdio by the official MCP client."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from shared.embedder import Embedder
from shared.sqlite.store import SqliteStore
from tests.conftest import clipdex_command, tiny_env
from tests.sample_store import fill_store

pytestmark = pytest.mark.integration


async def test_clipdex_mcp_over_stdio_lists_tools_and_searches(tmp_path: Path, tiny_embedder: Embedder) -> None:
    data = tmp_path / "data"
    with SqliteStore(data / "clipdex.sqlite3") as store:
        catalog = fill_store(store, tiny_embedder, tmp_path / "images")
    command, *args = clipdex_command()
    params = StdioServerParameters(command=command, args=[*args, "mcp"], env=tiny_env(data), cwd=tmp_path)
    async with Client(params, read_timeout_seconds=60) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools == {"search", "find_similar", "get_item", "index_status"}
        result = await client.call_tool("search", {"query": "a green square", "top_k": 3})
        assert not result.is_error
        hits = result.structured_content["hits"]  # type: ignore[index]
        assert len(hits) == 3
        assert result.structured_content["index"]["items"] == catalog.searchable  # type: ignore[index]
        similar = await client.call_tool("find_similar", {"item_id": catalog.image_ids["green"], "top_k": 2})
        assert catalog.image_ids["green"] not in [h["id"] for h in similar.structured_content["hits"]]  # type: ignore[index]
