"""Every MCP tool through the in-memory `mcp.Client`, including each error a caller can make."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp_types import CallToolResult, ImageContent, TextContent
from PIL import Image

from shared.core import Core, build_core
from shared.embedder import Embedder
from shared.fetch import FetchPolicy
from shared.heartbeat import Heartbeat
from tests.conftest import tiny_settings_for
from tests.sample_store import COLOURS, Sample, fill_data_dir, png_bytes
from tools.mcp_server import build_mcp_server
from tools.metrics import Metrics
from tools.queries import Queries

RED = png_bytes(COLOURS["red"])


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/red.png":
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(RED)))
            self.end_headers()
            self.wfile.write(RED)
        elif self.path == "/elsewhere":
            self.send_response(302)
            self.send_header("location", f"http://localhost:{self.server.server_address[1]}/red.png")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, tiny_embedder: Embedder, image_host: str
) -> Iterator[tuple[Core, Sample]]:
    base = tmp_path_factory.mktemp("mcp")
    settings = tiny_settings_for(
        base / "data",
        allowed_roots=[str(base / "images")],
        allowed_url_hosts=[image_host.removeprefix("http://")],  # 127.0.0.1:PORT: a loopback address, named
        max_image_bytes=20_000,
        max_pixels=10_000,
    )
    catalog = fill_data_dir(settings, tiny_embedder, base / "images")
    core = build_core(settings, embedder=tiny_embedder)
    yield core, catalog
    core.reader.close()  # not core.close(): the embedder is the session's


@pytest.fixture
def server(world: tuple[Core, Sample]) -> Any:
    core, _ = world
    return build_mcp_server(Queries(core, FetchPolicy.from_settings(core.settings), Metrics()))


@pytest.fixture
def catalog(world: tuple[Core, Sample]) -> Sample:
    return world[1]


async def call(server: Any, tool: str, **arguments: Any) -> CallToolResult:
    async with Client(server) as client:
        return await client.call_tool(tool, arguments)


def error_text(result: CallToolResult) -> str:
    assert result.is_error, f"expected a tool error, got {result.structured_content}"
    assert isinstance(result.content[0], TextContent)
    return result.content[0].text


def hit_ids(result: CallToolResult) -> list[str]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return [h["id"] for h in result.structured_content["hits"]]


# -- the tool list ---------------------------------------------------------------------------------------


async def test_tools_are_listed_read_only_with_docs_and_output_schemas(server: Any) -> None:
    async with Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"search", "find_similar", "get_item", "index_status"}
    for tool in tools.values():
        assert tool.annotations is not None
        assert tool.annotations.read_only_hint is True
        assert tool.annotations.open_world_hint is False
        assert tool.description and len(tool.description) > 80
        assert tool.output_schema is not None
    similar_args = tools["find_similar"].input_schema["properties"]
    assert {"item_id", "image_base64", "path", "url", "top_k", "filters", "min_score", "include_images"} <= set(
        similar_args
    )
    assert "hits" in tools["search"].output_schema["properties"]  # type: ignore[index]
    for name in ("search", "find_similar"):
        assert tools[name].input_schema["properties"]["collapse"]["enum"] == ["hash", "near", "parent", "none"]
    assert "one hit per product" in tools["search"].description  # type: ignore[operator]


# -- search ----------------------------------------------------------------------------------------------


async def test_search_returns_top_k_hits_best_first_with_index_info(server: Any, catalog: Sample) -> None:
    result = await call(server, "search", query="a red square", top_k=7)
    out = result.structured_content
    assert out is not None
    scores = [h["score"] for h in out["hits"]]
    assert len(scores) == 7 and scores == sorted(scores, reverse=True)
    assert {"id", "uri", "score", "metadata"} <= set(out["hits"][0])
    assert out["index"]["items"] == catalog.searchable
    assert out["index"]["newest_indexed_at"] is not None
    assert out["index"]["generation"] == 0
    assert out["query_truncated"] is False
    assert not any(isinstance(c, ImageContent) for c in result.content)


async def test_search_filters_on_metadata_and_source(server: Any, catalog: Sample) -> None:
    shoes = await call(server, "search", query="anything", top_k=100, filters={"metadata": {"category": "shoes"}})
    hits = shoes.structured_content["hits"]  # type: ignore[index]
    assert len(hits) == len(catalog.synthetic_ids) // 2
    assert all(h["metadata"]["category"] == "shoes" for h in hits)
    flat = await call(server, "search", query="x", top_k=100, filters={"year": 2021, "category": "hats"})
    flat_hits = flat.structured_content["hits"]  # type: ignore[index]
    assert flat_hits and all(h["metadata"]["year"] == 2021 and h["metadata"]["category"] == "hats" for h in flat_hits)
    folder = await call(server, "search", query="x", top_k=100, filters={"source": "folder"})
    assert sorted(hit_ids(folder)) == sorted([*catalog.image_ids.values(), catalog.nested_id])


async def test_search_min_score_drops_weaker_hits(server: Any) -> None:
    everything = await call(server, "search", query="a photo", top_k=100)
    scores = [h["score"] for h in everything.structured_content["hits"]]  # type: ignore[index]
    cut = scores[len(scores) // 2]
    fewer = await call(server, "search", query="a photo", top_k=100, min_score=cut)
    kept = [h["score"] for h in fewer.structured_content["hits"]]  # type: ignore[index]
    assert 0 < len(kept) < len(scores) and min(kept) >= cut


async def test_search_with_images_returns_jpeg_thumbnails_of_at_most_256_px(server: Any, catalog: Sample) -> None:
    result = await call(server, "search", query="colours", top_k=5, filters={"source": "folder"}, include_images=True)
    images = [c for c in result.content if isinstance(c, ImageContent)]
    assert len(images) == len(catalog.image_ids) + 1
    for block in images:
        assert block.mime_type == "image/jpeg"
        img = Image.open(io.BytesIO(base64.b64decode(block.data)))
        assert img.format == "JPEG" and max(img.size) <= 256


async def test_search_with_images_notes_hits_without_a_readable_image(server: Any) -> None:
    result = await call(server, "search", query="hats", top_k=15, filters={"source": "kafka"}, include_images=True)
    assert not result.is_error
    notes = [c.text for c in result.content[1:] if isinstance(c, TextContent)]
    assert len(notes) == 15  # each hit gets a thumbnail or a note why not (no bytes spent: no budget reached)
    assert all("no thumbnail" in n and "CLIPDEX_ALLOWED_URL_HOSTS" in n for n in notes)


async def test_a_query_longer_than_the_context_is_truncated_not_refused(server: Any) -> None:
    result = await call(server, "search", query=" ".join(["red"] * 200), top_k=3)
    assert result.structured_content is not None
    assert result.structured_content["query_truncated"] is True
    assert len(result.structured_content["hits"]) == 3


async def test_a_huge_query_is_cut_before_tokenising_and_flagged(server: Any) -> None:
    """Issue 9: a 0.9 MB query took 3 s per tokenisation and stayed in the query cache."""
    result = await call(server, "search", query="a red square " * 80_000, top_k=3)  # 1 MB of JSON
    assert result.structured_content is not None
    assert result.structured_content["query_truncated"] is True
    assert len(result.structured_content["hits"]) == 3


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"query": "x", "top_k": 0}, "top_k must be a whole number from 1 to 100 (got 0)"),
        ({"query": "x", "top_k": 101}, "top_k must be a whole number from 1 to 100 (got 101)"),
        ({"query": ""}, "the query is empty"),
        ({"query": "   "}, "the query is empty"),
        ({"query": "x", "min_score": 3}, "min_score is a cosine similarity and must be between -1 and 1"),
        ({"query": "x", "filters": {"metadata": ["shoes"]}}, "filters.metadata"),
    ],
)
async def test_search_errors_say_what_to_fix(server: Any, arguments: dict[str, Any], expected: str) -> None:
    assert expected in error_text(await call(server, "search", **arguments))


# -- find_similar ----------------------------------------------------------------------------------------


async def test_find_similar_by_id_leaves_the_item_out(server: Any, catalog: Sample) -> None:
    target = catalog.image_ids["red"]
    result = await call(server, "find_similar", item_id=target, top_k=100)
    ids = hit_ids(result)
    assert target not in ids
    assert len(ids) == catalog.searchable - 1


async def test_find_similar_by_id_ranks_the_nearest_stored_vector_first(
    server: Any, world: tuple[Core, Sample]
) -> None:
    core, catalog = world
    stored = core.vectors.item_vector(catalog.synthetic_ids[3])
    assert stored is not None
    others = [i for i in catalog.synthetic_ids if i != catalog.synthetic_ids[3]]
    vectors = {i: core.vectors.item_vector(i) for i in others}
    nearest = max(vectors, key=lambda i: float(vectors[i] @ stored))  # type: ignore[operator]
    result = await call(server, "find_similar", item_id=catalog.synthetic_ids[3], top_k=3, filters={"source": "kafka"})
    assert hit_ids(result)[0] == nearest


async def test_find_similar_by_image_base64_finds_the_same_image(server: Any, catalog: Sample) -> None:
    b64 = base64.b64encode(RED).decode()
    for value in (b64, f"data:image/png;base64,{b64}"):
        result = await call(server, "find_similar", image_base64=value, top_k=3)
        assert hit_ids(result)[0] == catalog.image_ids["red"]
        assert result.structured_content["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # type: ignore[index]


async def test_find_similar_by_path_under_an_allowed_root(server: Any, catalog: Sample) -> None:
    result = await call(server, "find_similar", path=str(catalog.root / "red.png"), top_k=3)
    assert hit_ids(result)[0] == catalog.image_ids["red"]
    relative = await call(server, "find_similar", path="blue.png", top_k=3)
    assert hit_ids(relative)[0] == catalog.image_ids["blue"]


async def test_find_similar_by_url_on_an_allowed_host(server: Any, catalog: Sample, image_host: str) -> None:
    result = await call(server, "find_similar", url=f"{image_host}/red.png", top_k=3, include_images=True)
    assert hit_ids(result)[0] == catalog.image_ids["red"]
    assert any(isinstance(c, ImageContent) for c in result.content)


async def test_find_similar_refuses_paths_outside_the_roots(server: Any, catalog: Sample, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(RED)
    assert "outside the allowed roots" in error_text(await call(server, "find_similar", path=str(outside)))
    escape = f"{catalog.root}/../{catalog.root.name}/../../{outside.relative_to(outside.anchor)}"
    assert "outside the allowed roots" in error_text(await call(server, "find_similar", path=escape))
    link = catalog.root / "link.png"
    os.symlink(outside, link)
    try:
        assert "outside the allowed roots" in error_text(await call(server, "find_similar", path=str(link)))
    finally:
        link.unlink()


async def test_find_similar_refuses_hosts_not_allowed_and_redirects_elsewhere(server: Any, image_host: str) -> None:
    port = image_host.rsplit(":", 1)[1]
    other = error_text(await call(server, "find_similar", url=f"http://localhost:{port}/red.png"))
    assert "'localhost' is not in CLIPDEX_ALLOWED_URL_HOSTS" in other
    redirect = error_text(await call(server, "find_similar", url=f"{image_host}/elsewhere"))
    assert "redirects to another host" in redirect
    scheme = error_text(await call(server, "find_similar", url="ftp://127.0.0.1/red.png"))
    assert "only http and https" in scheme


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({}, "give exactly one of item_id"),
        ({"item_id": "folder:red.png", "path": "red.png"}, "2 were given (item_id, path)"),
        ({"image_base64": "not base64 at all!"}, "image_base64 is not valid base64"),
        ({"image_base64": base64.b64encode(os.urandom(30_000)).decode()}, "over the limit of 20,000"),
        ({"image_base64": base64.b64encode(b"plain text, not a picture").decode()}, "not an image"),
        ({"image_base64": base64.b64encode(png_bytes((1, 2, 3), (200, 200))).decode()}, "over the limit of 10,000"),
        ({"item_id": "kafka:nope"}, "no item with id 'kafka:nope'"),
        ({"item_id": "kafka:bad"}, "has no vector (status failed: not an image"),
        ({"item_id": ""}, "item_id is empty"),
        ({"path": "missing.png"}, "no such file"),
        ({"item_id": "folder:red.png", "top_k": 500}, "top_k must be a whole number from 1 to 100"),
    ],
)
async def test_find_similar_errors_say_what_to_fix(server: Any, arguments: dict[str, Any], expected: str) -> None:
    assert expected in error_text(await call(server, "find_similar", **arguments))


async def test_url_fetching_is_off_without_an_allowlist(world: tuple[Core, Sample], image_host: str) -> None:
    core, _ = world
    policy = FetchPolicy(roots=(), hosts=frozenset(), max_bytes=20_000)
    server = build_mcp_server(Queries(core, policy, Metrics()))
    text = error_text(await call(server, "find_similar", url=f"{image_host}/red.png"))
    assert "URL fetching is off" in text
    assert "no allowed roots are configured" in error_text(await call(server, "find_similar", path="red.png"))


# -- get_item and index_status ---------------------------------------------------------------------------


async def test_get_item_shows_metadata_status_and_uri(server: Any, catalog: Sample) -> None:
    result = await call(server, "get_item", item_id=catalog.image_ids["green"])
    item = result.structured_content
    assert item is not None
    assert item["status"] == "indexed" and item["searchable"] is True
    assert item["metadata"] == {"colour": "green", "year": 2021}
    assert item["uri"] == str(catalog.root / "green.png")
    nested = await call(server, "get_item", item_id=catalog.nested_id)
    assert nested.structured_content["id"] == catalog.nested_id  # type: ignore[index]


async def test_get_item_explains_a_failed_item_and_refuses_an_unknown_one(server: Any, catalog: Sample) -> None:
    failed = (await call(server, "get_item", item_id=catalog.failed_id)).structured_content
    assert failed is not None
    assert failed["status"] == "failed" and failed["searchable"] is False
    assert "not an image" in failed["reason"]
    assert "no item with id 'kafka:missing'" in error_text(await call(server, "get_item", item_id="kafka:missing"))


async def test_index_status_reports_counts_model_and_lag(server: Any, catalog: Sample) -> None:
    status = (await call(server, "index_status")).structured_content
    assert status is not None
    assert status["items"] == catalog.searchable
    assert status["failed"] == 1 and status["dead_letters"] == 1
    assert status["recent_dead_letters"][0]["item_id"] == catalog.failed_id
    assert status["model"]["name"] == "clipdex-tiny" and status["model"]["dim"] == 32
    assert status["index_vectors"] == catalog.searchable
    assert status["generation"] == 0 and status["last_compaction_at"] is None
    assert status["pending_changes"] == 0
    assert (status["lag_s"], status["pending"], status["indexers"]) == (None, 0, [])  # no indexer runs


async def test_index_status_reports_the_lag_of_a_running_indexer(server: Any, world: tuple[Core, Sample]) -> None:
    heartbeat = Heartbeat(world[0].settings.data_dir, "kafka", topic="events")
    heartbeat.beat(pending=4, lag_s=1.25)
    try:
        status = (await call(server, "index_status")).structured_content
    finally:
        heartbeat.path.unlink()
    assert status is not None
    assert (status["lag_s"], status["pending"]) == (1.25, 4)
    (indexer,) = status["indexers"]
    assert (indexer["source"], indexer["state"], indexer["lag_s"], indexer["pending"]) == ("kafka", "running", 1.25, 4)


# -- pages, examples, resources and the image budget (issue 14) --------------------------------------------------


async def test_thumbnails_stop_at_the_byte_budget_and_say_where(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import tools.mcp_server as mcp_module

    whole = await call(server, "search", query="colours", top_k=4, filters={"source": "folder"}, include_images=True)
    sizes = [len(c.data) for c in whole.content if isinstance(c, ImageContent)]
    assert len(sizes) == 4
    monkeypatch.setattr(mcp_module, "IMAGE_BUDGET", sizes[0] + sizes[1] + 1)  # room for two
    cut = await call(server, "search", query="colours", top_k=4, filters={"source": "folder"}, include_images=True)
    images = [c for c in cut.content if isinstance(c, ImageContent)]
    notes = [c.text for c in cut.content if isinstance(c, TextContent)]
    assert len(images) == 2 and sum(len(i.data) for i in images) <= sizes[0] + sizes[1] + 1
    assert any("thumbnails stop at result 2" in n and "2 more" in n for n in notes)
    assert len(cut.structured_content["hits"]) == 4  # type: ignore[index]  # every hit is still listed


async def test_every_hit_has_a_resource_link_and_the_resources_read(server: Any, catalog: Sample) -> None:
    nested = catalog.nested_id  # folder:sub/dir/x.png
    async with Client(server) as client:
        result = await client.call_tool("search", {"query": "x", "top_k": 5, "filters": {"source": "folder"}})
        links = [c for c in result.content if c.type == "resource_link"]
        hits = result.structured_content["hits"]  # type: ignore[index]
        assert [str(link.uri) for link in links] == [h["resource"] for h in hits] and len(links) == len(hits)
        uri = "clipdex://items/folder%3Asub%2Fdir%2Fx.png"
        assert uri in [h["resource"] for h in hits]
        item = (await client.read_resource(uri)).contents[0]
        image = (await client.read_resource(uri + "/image")).contents[0]
    assert f'"{nested}"' in item.text  # type: ignore[union-attr]
    with Image.open(io.BytesIO(base64.b64decode(image.blob))) as img:  # type: ignore[union-attr]
        assert img.format == "JPEG"  # a PNG file, re-encoded


async def test_like_unlike_and_pages_over_mcp(server: Any, catalog: Sample) -> None:
    red = catalog.image_ids["red"]
    liked = await call(server, "search", query="x", like=[red], top_k=3, collapse="none")
    assert red not in hit_ids(liked)
    first = await call(server, "search", query="x", top_k=5)
    assert first.structured_content["next_cursor"]  # type: ignore[index]
    second = await call(server, "search", query="x", top_k=5, cursor=first.structured_content["next_cursor"])  # type: ignore[index]
    assert not set(hit_ids(first)) & set(hit_ids(second)) and len(hit_ids(second)) == 5
    unliked = await call(server, "search", query="x", unlike=[red, "green things"], top_k=5)
    assert red not in hit_ids(unliked)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"query": "x", "cursor": "garbage"}, "not one this server gave out"),
        ({"query": "x", "max_drop": -1}, "max_drop"),
        ({"query": "x", "sort_by": "year"}, "sort_by takes metadata.KEY"),
        ({"query": "x", "like": ["kafka:nope"]}, "no item with id 'kafka:nope'"),
        ({"query": "x", "like": [""]}, "item_id is empty"),
        ({"query": "x", "like": ["y"] * 20}, "at most 16 terms"),
    ],
)
async def test_bad_shaping_arguments_are_tool_errors(server: Any, arguments: dict[str, Any], expected: str) -> None:
    assert expected in error_text(await call(server, "search", **arguments))
