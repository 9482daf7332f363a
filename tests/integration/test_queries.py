"""The queries people ask, against a real `clipdex serve` with the trained shapes model, over HTTP and MCP
(streamable HTTP): "like this but red", negatives, a relative cutoff, pages, copies collapsed, sorting,
item resources and thumbnails under a byte budget.

Generated images of known colour and shape are embedded with the shapes model and written to the store
as an indexer would (with metadata: colour, shape, year, and keys that look like SQL or expressions);
a file copied byte for byte and one re-encoded and resized stand in for duplicates; the yellow crosses are
the images of two products (Y-1 with four, Y-2 with two), written as the indexer writes a product's images.
Every check reads the colour and shape from the hit's metadata.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import BlobResourceContents, TextResourceContents
from PIL import Image

from clipdex import synthetic
from shared.embedder import Embedder, ModelSpec
from shared.roles import Upsert
from shared.sqlite.store import SqliteStore
from shared.types import image_id
from tests.brokers import free_port, stop_process
from tests.conftest import SHAPES_MODELS, clipdex_command

pytestmark = pytest.mark.integration

WEIGHTS = SHAPES_MODELS / "clipdex-shapes.safetensors"
ODD_KEY = "x' OR '1'='1"  # a metadata key (and values below) that SQL or an expression parser would misread
ODD_VALUE = "1; DROP TABLE items; --"
PLAN = [  # colour, shape, how many, seed
    ("red", "circle", 10, 11),
    ("red", "square", 6, 12),
    ("blue", "circle", 4, 13),
    ("white", "circle", 3, 14),
    ("black", "circle", 3, 18),
    ("green", "triangle", 6, 15),
    ("yellow", "cross", 6, 16),
    ("blue", "square", 4, 17),
]


@dataclass(frozen=True)
class Served:
    url: str
    ids: dict[tuple[str, str], list[str]]  # (colour, shape) -> item ids
    copy: tuple[str, str]  # (original, byte-for-byte copy)
    reencoded: tuple[str, str]  # (original, re-encoded and resized copy)
    items: int
    root: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("queries")
    root, data = base / "images", base / "data"
    written = []
    for colour, shape, n, seed in PLAN:
        written += synthetic.write_folder(root, n, seed, size=128, colours=[colour], shapes=[shape], start=len(written))
    blue_square = next(w for w in written if (w.colour, w.shape) == ("blue", "square"))
    copy = root / "sub dir" / "copy: of a blue square.jpg"  # an id with a space, a colon and a slash
    copy.parent.mkdir()
    shutil.copyfile(blue_square.path, copy)
    triangle = next(w for w in written if (w.colour, w.shape) == ("green", "triangle"))
    reencoded = root / "green-triangle-reencoded.png"
    with Image.open(triangle.path) as img:
        img.convert("RGB").resize((112, 112)).save(reencoded, format="PNG")
    files = [(w.path, w.colour, w.shape) for w in written]
    files += [(copy, "blue", "square"), (reencoded, "green", "triangle")]

    embedder = Embedder(ModelSpec("clipdex-shapes", str(WEIGHTS), SHAPES_MODELS, "cpu", "fp32"))
    embedder.load()
    vectors = embedder.encode_images([Image.open(p).convert("RGB") for p, _, _ in files])
    ids: dict[tuple[str, str], list[str]] = {}
    ups = []
    for n, ((path, colour, shape), vector) in enumerate(zip(files, vectors, strict=True)):
        item_id, source = f"folder:{path.relative_to(root)}", "folder"
        metadata: dict[str, Any] = {"colour": colour, "shape": shape, ODD_KEY: ODD_VALUE if n % 3 == 0 else "x"}
        if (colour, shape) == ("yellow", "cross"):
            product = "Y-1" if len(ids.get((colour, shape), [])) < 4 else "Y-2"
            item_id, source, metadata["parent"] = image_id(f"kafka:{product}", str(path)), "kafka", product
        ids.setdefault((colour, shape), []).append(item_id)
        if n % 7:
            metadata["year"] = 2000 + (n * 37) % 23  # every seventh has none
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        ups.append(Upsert(item_id, source, str(path), digest, metadata, vector))
    with SqliteStore(data / "clipdex.sqlite3") as store:
        store.bind_model(embedder.identity)
        store.apply(upserts=ups)
    embedder.close()

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPDEX_")} | {
        "CLIPDEX_DATA_DIR": str(data),
        "CLIPDEX_MODEL": "clipdex-shapes",
        "CLIPDEX_PRETRAINED": str(WEIGHTS),
        "CLIPDEX_MODEL_CONFIGS": str(SHAPES_MODELS),
        "CLIPDEX_DEVICE": "cpu",
        "CLIPDEX_ALLOWED_ROOTS": str(root),
        "HF_HUB_OFFLINE": "1",
    }
    log = base / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*clipdex_command(), "serve", "--port", str(port)], env=env, stdout=out, stderr=out)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).json().get("items") == len(files):
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield Served(
            url,
            ids,
            (f"folder:{blue_square.path.name}", f"folder:{copy.relative_to(root)}"),
            (f"folder:{triangle.path.name}", f"folder:{reencoded.name}"),
            len(files),
            root,
        )
    finally:
        stop_process(proc, timeout_s=15)


@pytest.fixture
async def api(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
        yield client


@asynccontextmanager
async def mcp_client(url: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(timeout=60) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client,
    ):
        yield client


def kinds(hits: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(h["metadata"]["colour"], h["metadata"]["shape"]) for h in hits]


async def post(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await api.post("/search", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    for hit in result["hits"]:
        assert {"id", "uri", "score", "metadata", "duplicates"} <= set(hit)
    return result


# -- like this one, but ... ---------------------------------------------------------------------------------


async def test_a_circle_like_a_red_square_ranks_red_circles_first(served: Served, api: httpx.AsyncClient) -> None:
    red_square = served.ids[("red", "square")][0]
    plain = await post(api, terms=[{"text": "a circle"}], top_k=5)
    assert ("red", "circle") not in kinds(plain["hits"])  # the model's circles, before the example steers them
    liked = await post(api, terms=[{"text": "a circle"}, {"item_id": red_square}], top_k=5)
    assert kinds(liked["hits"]) == [("red", "circle")] * 5
    async with mcp_client(served.url) as client:
        result = await client.call_tool("search", {"query": "a circle", "like": [red_square], "top_k": 5})
    assert kinds(result.structured_content["hits"]) == [("red", "circle")] * 5  # type: ignore[index]
    assert red_square not in [h["id"] for h in result.structured_content["hits"]]  # type: ignore[index]


async def test_unlike_red_pushes_red_circles_out_of_the_top_five(served: Served, api: httpx.AsyncClient) -> None:
    def best_red_rank(hits: list[dict[str, Any]]) -> int:
        return kinds(hits).index(("red", "circle"))

    plain = (await api.get("/search", params={"query": "a circle", "top_k": 60})).json()
    unliked = (await api.get("/search", params={"query": "a circle", "unlike": "red", "top_k": 60})).json()
    assert best_red_rank(unliked["hits"]) >= 5 > 0
    assert best_red_rank(unliked["hits"]) > best_red_rank(plain["hits"])  # it moved: the term did something
    assert all(shape == "circle" for _, shape in kinds(unliked["hits"])[:5])  # other circles exist: they lead
    async with mcp_client(served.url) as client:
        result = await client.call_tool("search", {"query": "a circle", "unlike": ["red"], "top_k": 5})
    assert ("red", "circle") not in kinds(result.structured_content["hits"])  # type: ignore[index]


async def test_an_uploaded_image_mixes_with_words(api: httpx.AsyncClient, tmp_path: Path) -> None:
    """This one (an uploaded red circle, not in the index), but a square: multipart, a JSON `query` part
    naming the file."""
    (upload,) = synthetic.write_folder(tmp_path, 1, 999, size=128, colours=["red"], shapes=["circle"])
    red_circle = upload.path.read_bytes()
    body = '{"terms": [{"upload": "img"}, {"text": "a square", "weight": 1}], "top_k": 3}'
    response = await api.post("/search", files={"img": ("c.jpg", red_circle, "image/jpeg")}, data={"query": body})
    assert response.status_code == 200, response.text
    found = kinds(response.json()["hits"])
    assert found[0] == ("red", "square") and {colour for colour, _ in found} == {"red"}
    alone = await api.post("/search", files={"file": ("c.jpg", red_circle, "image/jpeg")})  # a file, no query part
    assert kinds(alone.json()["hits"])[:3] == [("red", "circle")] * 3
    bad = await api.post("/search", json={"terms": [{"text": "red", "weight": -1}]})
    assert bad.status_code == 400 and "positive" in bad.json()["error"]


# -- a relative cutoff, pages ---------------------------------------------------------------------------------


async def test_the_relative_cutoff_drops_the_off_class_tail(api: httpx.AsyncClient) -> None:
    everything = await post(api, terms=[{"text": "a red circle"}], top_k=30)
    assert set(kinds(everything["hits"])) != {("red", "circle")}
    close = await post(api, terms=[{"text": "a red circle"}], top_k=30, max_drop=0.15)
    assert len(close["hits"]) >= 5 and set(kinds(close["hits"])) == {("red", "circle")}
    assert close["next_cursor"] is None


async def test_pages_never_overlap_and_concatenate_to_the_deep_search(served: Served, api: httpx.AsyncClient) -> None:
    deep = await post(api, terms=[{"text": "a square"}], top_k=100, collapse="none")
    assert len(deep["hits"]) == served.items and deep["next_cursor"] is None
    shown: list[str] = []
    cursor = None
    for size in [7, 3, 11] * 20:
        params: dict[str, Any] = {"query": "a square", "top_k": size, "collapse": "none"}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/search", params=params)).json()
        shown += [h["id"] for h in page["hits"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert shown == [h["id"] for h in deep["hits"]]
    async with mcp_client(served.url) as client:
        first = (
            await client.call_tool("search", {"query": "a square", "top_k": 4, "collapse": "none"})
        ).structured_content
        second = await client.call_tool(
            "search",
            {"query": "a square", "top_k": 4, "collapse": "none", "cursor": first["next_cursor"]},  # type: ignore[index]
        )
        other = await client.call_tool("search", {"query": "a circle", "cursor": first["next_cursor"]})  # type: ignore[index]
    assert [h["id"] for h in first["hits"] + second.structured_content["hits"]] == shown[:8]  # type: ignore[index,operator]
    assert other.is_error and "another search" in other.content[0].text  # type: ignore[union-attr]


# -- copies ---------------------------------------------------------------------------------------------------


async def test_copies_of_one_file_collapse_into_one_hit_listing_the_others(
    served: Served, api: httpx.AsyncClient
) -> None:
    original, copy = served.copy
    folded = await post(api, terms=[{"text": "a blue square"}], top_k=10)
    ids = [h["id"] for h in folded["hits"]]
    assert (original in ids) != (copy in ids)  # one of them shows
    hit = next(h for h in folded["hits"] if h["id"] in (original, copy))
    assert hit["duplicates"] == [copy if hit["id"] == original else original]
    every = await post(api, terms=[{"text": "a blue square"}], top_k=10, collapse="none")
    assert {original, copy} <= {h["id"] for h in every["hits"]}
    assert all(h["duplicates"] == [] for h in every["hits"])


async def test_near_collapses_a_reencoded_copy(served: Served, api: httpx.AsyncClient) -> None:
    original, reencoded = served.reencoded
    by_hash = await post(api, terms=[{"text": "a green triangle"}], top_k=10)
    assert {original, reencoded} <= {h["id"] for h in by_hash["hits"]}  # different files: both show
    near = await post(api, terms=[{"text": "a green triangle"}], top_k=10, collapse="near")
    groups = [{h["id"], *h["duplicates"]} for h in near["hits"]]
    assert any({original, reencoded} <= g for g in groups)
    assert sum(original in g or reencoded in g for g in groups) == 1


async def test_parent_shows_each_product_once_its_best_image_listing_the_others(
    served: Served, api: httpx.AsyncClient
) -> None:
    every = await post(api, terms=[{"text": "a yellow cross"}], top_k=100, collapse="none")
    images = [h for h in every["hits"] if "parent" in h["metadata"]]
    assert len(every["hits"]) == served.items and len(images) == 6
    params = {"query": "a yellow cross", "top_k": 100, "collapse": "parent"}
    folded = (await api.get("/search", params=params)).json()
    products = [h for h in folded["hits"] if "parent" in h["metadata"]]
    assert sorted(h["metadata"]["parent"] for h in products) == ["Y-1", "Y-2"]
    for hit in products:
        mine = [h["id"] for h in images if h["metadata"]["parent"] == hit["metadata"]["parent"]]  # best first
        assert hit["id"] == mine[0] and hit["duplicates"] == mine[1:]
    assert len(folded["hits"]) == served.items - 4 - 1  # four images folded into their products, a copy by hash
    one = await post(api, terms=[{"text": "a yellow cross"}], collapse="parent", filters={"parent": "Y-2"})
    assert [(h["metadata"]["parent"], len(h["duplicates"])) for h in one["hits"]] == [("Y-2", 1)]
    async with mcp_client(served.url) as client:
        result = await client.call_tool("search", {"query": "a yellow cross", "top_k": 3, "collapse": "parent"})
    mcp_hits = result.structured_content["hits"]  # type: ignore[index]
    assert [(h["id"], h["duplicates"]) for h in mcp_hits] == [(h["id"], h["duplicates"]) for h in folded["hits"][:3]]


# -- order, and keys that look like code -------------------------------------------------------------------------


async def test_sort_by_a_metadata_field_orders_the_relevant_results(api: httpx.AsyncClient) -> None:
    body = {"terms": [{"text": "a red circle"}], "top_k": 20, "max_drop": 0.15}
    relevant = await post(api, **body)
    newest = await post(api, **body, sort_by="metadata.year", order="desc")
    assert {h["id"] for h in newest["hits"]} == {h["id"] for h in relevant["hits"]}  # the same set, reordered
    years = [h["metadata"].get("year") for h in newest["hits"]]
    present = [y for y in years if y is not None]
    assert present == sorted(present, reverse=True) and years[: len(present)] == present  # missing ones last
    oldest = await post(api, **body, sort_by="metadata.year", order="asc")
    assert [y for y in (h["metadata"].get("year") for h in oldest["hits"]) if y is not None] == sorted(present)


async def test_keys_and_values_that_look_like_sql_or_expressions_are_data(
    served: Served, api: httpx.AsyncClient
) -> None:
    odd = await post(api, terms=[{"text": "a shape"}], top_k=100, collapse="none", filters={ODD_KEY: ODD_VALUE})
    assert odd["hits"] and all(h["metadata"][ODD_KEY] == ODD_VALUE for h in odd["hits"])
    params = {"query": "a shape", "top_k": 100, f"filter.{ODD_KEY}": ODD_VALUE, "collapse": "none"}
    assert [h["id"] for h in (await api.get("/search", params=params)).json()["hits"]] == [h["id"] for h in odd["hits"]]
    for value in ["x' OR '1'='1", '" or 1 == 1 or "', "') OR 1=1 --", "$.colour"]:
        none = await post(api, terms=[{"text": "a shape"}], filters={"colour": value})
        assert none["hits"] == [] and not none["partial"]
    sorted_odd = await post(api, terms=[{"text": "a shape"}], top_k=100, sort_by=f"metadata.{ODD_KEY}", order="asc")
    values = [h["metadata"][ODD_KEY] for h in sorted_odd["hits"]]
    assert values == sorted(values)
    assert (await api.get("/health")).json()["items"] == served.items  # nothing was dropped


# -- MCP: resources, thumbnails within the budget ---------------------------------------------------------------------


async def test_hits_link_to_resources_for_metadata_thumbnail_and_image(served: Served) -> None:
    _, copy = served.copy  # its id holds a space, a colon and a slash
    async with mcp_client(served.url) as client:
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        assert templates == {
            "clipdex://items/{item_id}",
            "clipdex://items/{item_id}/thumbnail",
            "clipdex://items/{item_id}/image",
        }
        result = await client.call_tool("search", {"query": "a blue square", "top_k": 3, "collapse": "none"})
        hits = result.structured_content["hits"]  # type: ignore[index]
        links = [c for c in result.content if c.type == "resource_link"]
        assert [str(link.uri) for link in links] == [h["resource"] for h in hits]
        resource = f"clipdex://items/{quote(copy, safe='')}"
        item = (await client.read_resource(resource)).contents[0]
        thumb = (await client.read_resource(resource + "/thumbnail")).contents[0]
        image = (await client.read_resource(resource + "/image")).contents[0]
        with pytest.raises(MCPError, match=r"no item with id 'folder:nope\.jpg'"):
            await client.read_resource("clipdex://items/folder%3Anope.jpg")
    assert isinstance(item, TextResourceContents) and f'"id":"{copy}"'.replace(" ", "") in item.text.replace(" ", "")
    assert isinstance(thumb, BlobResourceContents) and thumb.mime_type == "image/jpeg"
    with Image.open(io.BytesIO(base64.b64decode(thumb.blob))) as img:
        assert img.format == "JPEG" and max(img.size) <= 256
    assert isinstance(image, BlobResourceContents)
    assert base64.b64decode(image.blob) == (served.root / copy.removeprefix("folder:")).read_bytes()  # the file itself


async def test_include_images_stays_within_the_byte_budget(served: Served) -> None:
    from tools.mcp_server import IMAGE_BUDGET

    async with mcp_client(served.url) as client:
        result = await client.call_tool("search", {"query": "a shape", "top_k": 100, "include_images": True})
    images = [c for c in result.content if c.type == "image"]
    hits = result.structured_content["hits"]  # type: ignore[index]
    assert images and sum(len(i.data) for i in images) <= IMAGE_BUDGET  # type: ignore[union-attr]
    assert len(images) == len(hits)  # 128 px thumbnails: all of them fit in the budget here
