"""The HTTP API in process (httpx's ASGI transport against the real app, store and index): every endpoint,
its bad inputs, the token, the Host/Origin checks and the body limit."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from shared.core import Core, build_core
from shared.embedder import Embedder
from tests.conftest import tiny_settings_for
from tests.sample_store import COLOURS, Sample, fill_data_dir, png_bytes
from tools.app import build_app

BASE = "http://127.0.0.1:8765"
MAX_UPLOAD = 64 * 1024
RED = png_bytes(COLOURS["red"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_embedder: Embedder) -> Iterator[tuple[Core, Sample]]:
    base = tmp_path_factory.mktemp("http")
    settings = tiny_settings_for(base / "data", allowed_roots=[str(base / "images")], max_upload_bytes=MAX_UPLOAD)
    catalog = fill_data_dir(settings, tiny_embedder, base / "images")
    core = build_core(settings, embedder=tiny_embedder)
    yield core, catalog
    core.reader.close()  # not core.close(): the embedder is the session's


@pytest.fixture
def catalog(world: tuple[Core, Sample]) -> Sample:
    return world[1]


def client_for(core: Core, **overrides: Any) -> httpx.AsyncClient:
    if "api_token" in overrides:
        overrides["api_token"] = SecretStr(overrides["api_token"])
    settings = core.settings.model_copy(update=overrides)
    app = build_app(core, settings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


@pytest.fixture
async def client(world: tuple[Core, Sample]) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(world[0]) as c:
        yield c


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    for word in words:
        assert word in message


# -- /search -----------------------------------------------------------------------------------------------


async def test_search_returns_hits_and_index_info(client: httpx.AsyncClient, catalog: Sample) -> None:
    response = await client.get("/search", params={"query": "a red square", "top_k": 5})
    assert response.status_code == 200
    body = response.json()
    assert len(body["hits"]) == 5
    assert body["index"]["items"] == catalog.searchable
    assert set(body["hits"][0]) == {"id", "uri", "score", "metadata", "duplicates"}


async def test_search_filters_by_metadata_with_json_values_and_by_source(client: httpx.AsyncClient) -> None:
    shoes = (await client.get("/search", params={"query": "x", "top_k": 100, "filter.category": "shoes"})).json()
    assert shoes["hits"] and all(h["metadata"]["category"] == "shoes" for h in shoes["hits"])
    number = (await client.get("/search", params={"query": "x", "top_k": 100, "filter.year": "2021"})).json()
    assert number["hits"] and all(h["metadata"]["year"] == 2021 for h in number["hits"])
    text = (await client.get("/search", params={"query": "x", "top_k": 100, "filter.code": '"2021"'})).json()
    assert text["hits"] and all(h["metadata"]["code"] == "2021" for h in text["hits"])
    assert (await client.get("/search", params={"query": "x", "filter.code": "2021"})).json()["hits"] == []
    folder = (await client.get("/search", params={"query": "x", "top_k": 100, "source": "folder"})).json()
    assert {h["id"].split(":")[0] for h in folder["hits"]} == {"folder"}


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"query": "x", "top_k": "0"}, ["top_k", "1 to 100", "got 0"]),
        ({"query": "x", "top_k": "1000"}, ["top_k", "1 to 100", "got 1000"]),
        ({"query": "x", "top_k": "ten"}, ["top_k", "'ten'"]),
        ({"query": ""}, ["query is empty"]),
        ({"query": "  "}, ["query is empty"]),
        ({}, ["?query="]),
        ({"q": "cats"}, ["unknown query parameter(s) q", "query"]),
        ({"query": "x", "min_score": "high"}, ["min_score must be a number"]),
        ({"query": "x", "min_score": "2"}, ["min_score", "between -1 and 1"]),
        ({"query": "x", "filter.": "1"}, ["filter.<key>=<value>"]),
    ],
)
async def test_search_bad_input_gets_400_saying_what_to_fix(
    client: httpx.AsyncClient, params: dict[str, str], words: list[str]
) -> None:
    assert_error(await client.get("/search", params=params), 400, *words)


# -- /similar ----------------------------------------------------------------------------------------------


async def test_a_long_query_is_cut_and_flagged(client: httpx.AsyncClient) -> None:
    response = await client.get("/search", params={"query": "red " * 10_000, "top_k": 2})
    assert response.status_code == 200 and response.json()["query_truncated"] is True
    short = await client.get("/search", params={"query": "red", "top_k": 2})
    assert short.json()["query_truncated"] is False


async def test_similar_by_id_leaves_the_item_out(client: httpx.AsyncClient, catalog: Sample) -> None:
    target = catalog.image_ids["blue"]
    body = (await client.get("/similar", params={"id": target, "top_k": 100})).json()
    ids = [h["id"] for h in body["hits"]]
    assert target not in ids and len(ids) == catalog.searchable - 1


async def test_similar_by_id_errors(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/similar", params={"id": "kafka:nope"}), 404, "no item with id 'kafka:nope'")
    assert_error(await client.get("/similar"), 400, "?id=", "POST an image")
    assert_error(await client.get("/similar", params={"id": "folder:red.png", "top_k": "0"}), 400, "top_k")


async def test_similar_by_upload_finds_the_same_image(client: httpx.AsyncClient, catalog: Sample) -> None:
    multipart = await client.post("/similar", files={"file": ("red.png", RED, "image/png")}, params={"top_k": 3})
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["hits"][0]["id"] == catalog.image_ids["red"]
    raw = await client.post("/similar", content=RED, headers={"content-type": "image/png"})
    assert raw.json()["hits"][0]["id"] == catalog.image_ids["red"]


async def test_similar_upload_errors(client: httpx.AsyncClient) -> None:
    not_image = await client.post("/similar", files={"file": ("notes.txt", b"hello, not a picture", "text/plain")})
    assert_error(not_image, 422, "not an image")
    assert_error(await client.post("/similar", files={"other": ("a.png", RED, "image/png")}), 400, "field named 'file'")
    assert_error(await client.post("/similar", json={"image": "x"}), 400, "multipart/form-data", "application/json")
    huge = await client.post("/similar", files={"file": ("big.png", b"\0" * (MAX_UPLOAD + 1), "image/png")})
    assert_error(huge, 413, "CLIPDEX_MAX_UPLOAD_BYTES")
    bad_params = await client.post("/similar", files={"file": ("r.png", RED, "image/png")}, params={"top_k": 1000})
    assert_error(bad_params, 400, "top_k")


async def test_a_streamed_upload_is_cut_off_at_the_limit(client: httpx.AsyncClient) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit must count as it reads
        nonlocal sent
        for _ in range(1000):
            sent += 16 * 1024
            yield b"\0" * (16 * 1024)

    response = await client.post("/similar", content=chunks(), headers={"content-type": "image/png"})
    assert_error(response, 413, "CLIPDEX_MAX_UPLOAD_BYTES")
    assert sent < 2 * MAX_UPLOAD + 64 * 1024


# -- /items ------------------------------------------------------------------------------------------------


async def test_item_and_its_thumbnail(client: httpx.AsyncClient, catalog: Sample) -> None:
    item = await client.get(f"/items/{catalog.image_ids['red']}")
    assert item.status_code == 200
    assert item.json()["metadata"] == {"colour": "red", "year": 2021}
    nested = await client.get(f"/items/{catalog.nested_id}")
    assert nested.json()["id"] == catalog.nested_id
    thumb = await client.get(f"/items/{catalog.nested_id}/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(thumb.content))
    assert img.format == "JPEG" and max(img.size) <= 256


async def test_item_errors(client: httpx.AsyncClient, catalog: Sample) -> None:
    assert_error(await client.get("/items/kafka:nope"), 404, "no item with id 'kafka:nope'")
    assert_error(await client.get("/items/kafka:nope/thumbnail"), 404, "no item")
    remote = await client.get(f"/items/{catalog.synthetic_ids[0]}/thumbnail")
    assert_error(remote, 403, "CLIPDEX_ALLOWED_URL_HOSTS")
    failed = await client.get(f"/items/{catalog.failed_id}")
    assert failed.status_code == 200 and failed.json()["status"] == "failed"


# -- operations --------------------------------------------------------------------------------------------


async def test_health_metrics_and_docs(client: httpx.AsyncClient, catalog: Sample) -> None:
    health = (await client.get("/health")).json()
    assert health["status"] == "ok" and health["items"] == catalog.searchable
    await client.get("/search", params={"query": "metrics please"})
    await client.get("/search", params={"query": ""})
    metrics = await client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    assert 'clipdex_search_requests_total{transport="http",kind="text",outcome="ok"}' in text
    assert 'clipdex_search_requests_total{transport="http",kind="text",outcome="InvalidRequest"} 1' in text
    assert 'clipdex_search_latency_seconds_bucket{transport="http",kind="text",le="+Inf"}' in text
    assert f"clipdex_items {catalog.searchable}" in text
    assert "clipdex_dead_letters 1" in text
    spec = (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.") and {"/search", "/similar", "/items/{item_id}"} <= set(spec["paths"])
    assert "SearchOutput" in spec["components"]["schemas"]
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


async def test_unknown_routes_and_methods_get_json_errors(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/nothing"), 404, "see /docs")
    assert_error(await client.delete("/search"), 405, "DELETE is not allowed")


# -- the gate ----------------------------------------------------------------------------------------------


async def test_with_a_token_every_route_but_health_needs_it(world: tuple[Core, Sample]) -> None:
    async with client_for(world[0], api_token="s3cret") as c:
        missing = await c.get("/search", params={"query": "x"})
        assert_error(missing, 401, "Authorization: Bearer")
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert_error(await c.get("/metrics", headers={"authorization": "Bearer wrong"}), 401)
        assert_error(await c.post("/mcp", headers={"authorization": "Basic czNjcmV0"}, json={}), 401)
        good = await c.get("/search", params={"query": "x"}, headers={"authorization": "Bearer s3cret"})
        assert good.status_code == 200
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/openapi.json")).json()["security"] == [{"bearer": []}]


async def test_foreign_host_and_origin_headers_are_refused(world: tuple[Core, Sample]) -> None:
    async with client_for(world[0], allowed_hosts=["search.example.com"]) as c:
        assert_error(await c.get("/search", params={"query": "x"}, headers={"host": "evil.example"}), 421, "Host")
        assert_error(await c.post("/mcp", headers={"host": "evil.example:8765"}, json={}), 421)
        evil_origin = await c.get("/search", params={"query": "x"}, headers={"origin": "http://evil.example"})
        assert_error(evil_origin, 403, "origin")
        for host in ("localhost:9999", "127.0.0.1:8765", "search.example.com", "search.example.com:443"):
            ok = await c.get("/search", params={"query": "x"}, headers={"host": host})
            assert ok.status_code == 200, host
        same_origin = await c.get("/search", params={"query": "x"}, headers={"origin": "http://localhost:8765"})
        assert same_origin.status_code == 200


async def test_cross_site_browser_requests_are_refused_except_health(
    client: httpx.AsyncClient, catalog: Sample
) -> None:
    """A page on another site can make a browser fetch an <img> from a loopback server, sending no Origin:
    its thumbnails' success or failure told the page which files are indexed (issue 9)."""
    thumbnail = f"/items/{catalog.image_ids['red']}/thumbnail"
    cross = {"sec-fetch-site": "cross-site", "sec-fetch-dest": "image"}
    assert_error(await client.get(thumbnail, headers=cross), 403, "cross-site", "Sec-Fetch-Site")
    assert_error(await client.get("/search", params={"query": "x"}, headers=cross), 403, "cross-site")
    assert_error(await client.post("/mcp", headers=cross, json={}), 403, "cross-site")
    assert (await client.get("/health", headers=cross)).status_code == 200
    for site in ("same-origin", "same-site", "none"):
        ok = await client.get(thumbnail, headers={"sec-fetch-site": site})
        assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg", site
    # Following a shared link to the web UI's page from another site is a top-level navigation, which the
    # other site cannot read back: it opens. A navigation anywhere else, or a non-GET, does not.
    link = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate", "sec-fetch-dest": "document"}
    page = await client.get("/", params={"query": "red"}, headers=link)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert_error(await client.get(thumbnail, headers=link), 403, "cross-site")
    assert_error(await client.get("/", headers={**link, "sec-fetch-dest": "iframe"}), 403, "cross-site")
    assert_error(await client.post("/", headers=link), 403, "cross-site")


async def test_the_token_is_checked_before_the_body_limit(world: tuple[Core, Sample]) -> None:
    async with client_for(world[0], api_token="s3cret") as c:
        big = b"\0" * (MAX_UPLOAD + 10)
        no_token = await c.post("/similar", content=big, headers={"content-type": "image/png"})
        assert no_token.status_code == 401  # an anonymous caller learns nothing, not even the limit
        with_token = await c.post(
            "/similar", content=big, headers={"content-type": "image/png", "authorization": "Bearer s3cret"}
        )
        assert_error(with_token, 413)


# -- POST /search, pages, copies (issue 14) -------------------------------------------------------------------


async def test_post_search_takes_weighted_terms(client: httpx.AsyncClient, catalog: Sample) -> None:
    red, blue = catalog.image_ids["red"], catalog.image_ids["blue"]
    body = {"terms": [{"text": "a square"}, {"item_id": red, "weight": 2}, {"item_id": blue, "weight": -0.5}]}
    response = await client.post("/search", json={**body, "top_k": 100})
    assert response.status_code == 200, response.text
    ids = [h["id"] for h in response.json()["hits"]]
    assert red not in ids and blue not in ids and len(ids) == catalog.searchable - 2
    image = base64.b64encode(RED).decode()
    by_bytes = await client.post("/search", json={"terms": [{"image_base64": image}], "top_k": 1})
    assert [h["id"] for h in by_bytes.json()["hits"]] == [red]
    by_path = await client.post("/search", json={"terms": [{"path": "blue.png"}], "top_k": 1})
    assert [h["id"] for h in by_path.json()["hits"]] == [blue]


async def test_post_search_multipart_names_its_uploads(client: httpx.AsyncClient, catalog: Sample) -> None:
    red = catalog.image_ids["red"]
    files = [("a", ("a.png", RED, "image/png")), ("b", ("b.png", png_bytes(COLOURS["green"]), "image/png"))]
    query = '{"terms": [{"upload": "a"}, {"upload": "b", "weight": 0.01}], "top_k": 1}'
    response = await client.post("/search", files=files, data={"query": query})
    assert response.status_code == 200, response.text
    assert [h["id"] for h in response.json()["hits"]] == [red]
    unnamed = await client.post("/search", files=[files[0]])  # no query part: the file alone, weight 1
    assert [h["id"] for h in unnamed.json()["hits"]][:1] == [red]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"content": b"not json", "headers": {"content-type": "application/json"}}, ["not valid", "terms"]),
        ({"content": b"[" * 60_000, "headers": {"content-type": "application/json"}}, ["not valid"]),
        ({"json": {"terms": []}}, ["at least one term"]),
        ({"json": {"terms": [{"text": "x"}], "top_k": "ten"}}, ["top_k"]),
        ({"json": {"terms": [{"text": "x", "item_id": "y"}]}}, ["exactly one of"]),
        ({"json": {"terms": [{}]}}, ["exactly one of", "none was given"]),
        ({"json": {"terms": [{"text": "x", "weight": 0}]}}, ["non-zero"]),
        ({"json": {"terms": [{"text": "x", "weight": -1}]}}, ["positive"]),
        ({"json": {"terms": [{"text": "x"}], "extra": 1}}, ["extra"]),
        ({"json": {"terms": [{"text": "x"}], "collapse": "fuzzy"}}, ["collapse"]),
        ({"json": {"terms": [{"text": "x"}], "sort_by": "year"}}, ["metadata.KEY"]),
        ({"json": {"terms": [{"text": "x"}], "cursor": "AAAA"}}, ["cursor"]),
        ({"json": {"terms": [{"upload": "f"}]}}, ["no file part"]),
        ({"json": {"terms": [{"text": "x"}] * 17}}, ["at most 16"]),
        ({"json": {"terms": [{"image_base64": "AAAA"}] * 5}}, ["at most 4 images"]),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, ["JSON body"]),
    ],
)
async def test_post_search_bad_bodies_get_400_saying_what_to_fix(
    client: httpx.AsyncClient, kwargs: dict[str, Any], words: list[str]
) -> None:
    assert_error(await client.post("/search", **kwargs), 400, *words)


async def test_get_search_pages_with_a_cursor_and_shapes_with_options(client: httpx.AsyncClient) -> None:
    first = (await client.get("/search", params={"query": "x", "top_k": 10})).json()
    second = (await client.get("/search", params={"query": "x", "top_k": 10, "cursor": first["next_cursor"]})).json()
    deep = (await client.get("/search", params={"query": "x", "top_k": 20})).json()
    assert [h["id"] for h in first["hits"] + second["hits"]] == [h["id"] for h in deep["hits"]]
    other = await client.get("/search", params={"query": "y", "cursor": first["next_cursor"]})
    assert_error(other, 400, "another search")
    years = (
        await client.get(
            "/search",
            params={"query": "x", "top_k": 100, "sort_by": "metadata.year", "order": "asc", "source": "kafka"},
        )
    ).json()
    values = [h["metadata"]["year"] for h in years["hits"]]
    assert values == sorted(values) and len(values) == 40
    close = (await client.get("/search", params={"query": "x", "top_k": 100, "max_drop": "0"})).json()
    assert len(close["hits"]) == 1
    for bad, word in (({"max_drop": "far"}, "max_drop"), ({"order": "up"}, "order"), ({"collapse": "x"}, "collapse")):
        assert_error(await client.get("/search", params={"query": "x", **bad}), 400, word)


async def test_similar_takes_the_same_shaping_options(client: httpx.AsyncClient, catalog: Sample) -> None:
    first = (await client.get("/similar", params={"id": catalog.image_ids["red"], "top_k": 3})).json()
    nxt = {"id": catalog.image_ids["red"], "top_k": 3, "cursor": first["next_cursor"]}
    second = (await client.get("/similar", params=nxt)).json()
    assert len(second["hits"]) == 3 and not {h["id"] for h in first["hits"]} & {h["id"] for h in second["hits"]}


async def test_the_openapi_description_lists_exactly_the_parameters_search_takes(client: httpx.AsyncClient) -> None:
    from tools.http_api import SEARCH_PARAMS, TEXT_TERMS

    spec = (await client.get("/openapi.json")).json()
    get = {p["name"] for p in spec["paths"]["/search"]["get"]["parameters"]}
    assert get == set(TEXT_TERMS | SEARCH_PARAMS) | {"filter.<key>"}
    similar = {p["name"] for p in spec["paths"]["/similar"]["get"]["parameters"]}
    assert similar == set(SEARCH_PARAMS) | {"id", "filter.<key>"}
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/SearchIn"}
    assert {"terms", "top_k", "cursor", "max_drop", "collapse", "sort_by", "order"} <= set(
        spec["components"]["schemas"]["SearchIn"]["properties"]
    )
    collapse = next(p for p in spec["paths"]["/search"]["get"]["parameters"] if p["name"] == "collapse")
    modes = ["hash", "near", "parent", "none"]
    assert collapse["schema"]["enum"] == modes and "one hit per product" in collapse["description"]
    assert spec["components"]["schemas"]["SearchIn"]["properties"]["collapse"]["enum"] == modes
