"""What the server tells a client about a failure: through the real HTTP app and the real MCP client, no
error names an allowed root, the data directory, an internal address or a library's own text, and no
dead-letter or failure reason shows an absolute path or a URL's query string. The log keeps the detail."""

from __future__ import annotations

import base64
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent

from shared.core import Core, build_core
from shared.embedder import Embedder
from shared.errors import FetchFailed, ImageRejected, InvalidRequest, PathNotAllowed, SourceNotFound, StoreError
from shared.fetch import FetchPolicy
from shared.roles import Failure
from shared.stores import open_writer
from tests.conftest import tiny_settings_for
from tests.sample_store import Sample, damage_store_file, fill_data_dir, fill_store, png_bytes
from tools.app import build_app
from tools.mcp_server import build_mcp_server
from tools.metrics import Metrics
from tools.queries import Queries
from tools.redaction import STORE_UNAVAILABLE, Redactor

BASE = "http://127.0.0.1:8765"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CLOSED_PORT = closed_port()  # allowlisted by port (only 80 and 443 need no port): nothing listens
RETRY_AT = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SIGNED = "https://bucket.s3.amazonaws.com/cat.jpg?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_embedder: Embedder) -> Iterator[tuple[Core, Sample]]:
    base = tmp_path_factory.mktemp("redaction")
    settings = tiny_settings_for(
        base / "data",
        allowed_roots=[str(base / "images")],
        allowed_url_hosts=["127.0.0.1", f"127.0.0.1:{CLOSED_PORT}"],
        max_image_bytes=20_000,
    )
    with open_writer(settings, tiny_embedder.identity) as store:
        catalog = fill_store(store.writer, tiny_embedder, base / "images")
        store.writer.apply(
            failures=[
                Failure(
                    "folder",
                    str(base / "images" / "x.jpg"),
                    f"ImageRejected: {base}/images/x.jpg: not an image",
                    id="folder:x.jpg",
                ),
                Failure(
                    "kafka", "{}", "SourceNotFound: /srv/catalog/private/sku-1.jpg: no such file", id="kafka:sku-1"
                ),
                Failure(
                    "kafka",
                    "{}",
                    f"FetchFailed: {SIGNED}: HTTP 503",
                    id="kafka:signed",
                    retriable=True,
                    attempts=2,
                    retry_at=RETRY_AT,
                ),
                Failure("kafka", "{}", "FetchFailed: http://10.1.2.3:8080/a.jpg: HTTP 502", id="kafka:ten"),
            ]
        )
    core = build_core(settings, embedder=tiny_embedder)
    yield core, catalog
    core.reader.close()  # not core.close(): the embedder is the session's


def secrets_of(core: Core) -> list[str]:
    """What no client may read: the allowed roots and the data directory, as configured and as real paths."""
    roots = [str(r) for r in core.settings.allowed_roots] + [str(core.settings.data_dir)]
    return roots + [str(Path(r).resolve()) for r in roots] + ["/srv/catalog", "X-Amz", "deadbeef", "10.1.2.3"]


def assert_discloses_nothing(text: str, core: Core) -> None:
    for secret in secrets_of(core):
        assert secret not in text, f"{secret!r} in {text!r}"
    for library_text in ("Errno", "Connection refused", "Incorrect padding", "Non-base64", "ConnectError"):
        assert library_text not in text, f"{library_text!r} in {text!r}"


@pytest.fixture
async def http(world: tuple[Core, Sample]) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(world[0], world[0].settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        yield client


@pytest.fixture
def mcp(world: tuple[Core, Sample]) -> Any:
    core = world[0]
    return build_mcp_server(Queries(core, FetchPolicy.from_settings(core.settings), Metrics()))


async def call(server: Any, tool: str, **arguments: Any) -> CallToolResult:
    async with Client(server) as client:
        return await client.call_tool(tool, arguments)


def text_of(result: CallToolResult) -> str:
    assert isinstance(result.content[0], TextContent)
    return result.content[0].text


# -- errors -------------------------------------------------------------------------------------------------


async def test_mcp_errors_name_no_roots_addresses_or_library_texts(
    world: tuple[Core, Sample], mcp: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    core, catalog = world
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    caplog.set_level(logging.INFO, "tools")
    caplog.set_level(logging.INFO, "shared.fetch")
    cases = {
        "outside the allowed roots": {"path": str(outside)},
        "not valid base64": {"image_base64": "abc"},
        "could not be fetched": {"url": f"http://127.0.0.1:{CLOSED_PORT}/red.png"},
        "no vector": {"item_id": "folder:x.jpg"},
        "no such file": {"path": str(catalog.root / "missing.png")},
    }
    for expected, arguments in cases.items():
        result = await call(mcp, "find_similar", **arguments)
        assert result.is_error and expected in text_of(result), (arguments, text_of(result))
        assert_discloses_nothing(text_of(result), core)
    assert "Connection refused" in caplog.text or "ConnectError" in caplog.text  # the log keeps the detail


async def test_http_errors_name_no_roots_addresses_or_library_texts(
    world: tuple[Core, Sample], http: httpx.AsyncClient
) -> None:
    core, _ = world
    missing = await http.get("/similar", params={"id": "folder:x.jpg"})
    assert missing.status_code == 404 and "no vector" in missing.json()["error"]
    assert_discloses_nothing(missing.text, core)
    broken = await http.post("/similar", content=b"--x\r\nnot a form", headers={"content-type": "multipart/form-data"})
    assert broken.status_code == 400 and "curl: -F file=@photo.jpg" in broken.json()["error"]
    assert_discloses_nothing(broken.text, core)


async def test_a_store_failure_is_a_503_that_names_no_file(
    tmp_path: Path, tiny_embedder: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tiny_settings_for(tmp_path / "data", allowed_roots=[str(tmp_path)])
    core = build_core(settings, embedder=tiny_embedder)
    core.reader.close()  # every read now fails inside SQLite
    app = build_app(core, settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        response = await client.get("/metrics")
    assert response.status_code == 503 and "store" in response.json()["error"]
    assert str(tmp_path) not in response.text and "clipdex.sqlite3" not in response.text
    assert "clipdex.sqlite3" in caplog.text
    status = await call(build_mcp_server(Queries(core, FetchPolicy.from_settings(settings), Metrics())), "index_status")
    assert status.is_error and "store" in text_of(status) and str(tmp_path) not in text_of(status)


async def test_every_read_of_a_damaged_store_is_a_503_over_http_and_a_tool_error_over_mcp(
    tmp_path: Path, tiny_embedder: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing disk under a running server: every route and tool that reads the store says the store is
    unavailable (503, try again), never a 500 and never the file's path."""
    settings = tiny_settings_for(tmp_path / "data", allowed_roots=[str(tmp_path)])
    sample = fill_data_dir(settings, tiny_embedder, tmp_path / "images")
    core = build_core(settings, embedder=tiny_embedder)
    try:
        damage_store_file(settings.db_path)
        item = sample.image_ids["red"]
        app = build_app(core, settings)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
            responses = {
                "search": await client.get("/search", params={"query": "a red square"}),
                "similar": await client.get("/similar", params={"id": item}),
                "upload": await client.post("/similar", files={"file": ("r.png", png_bytes((200, 0, 0)), "image/png")}),
                "item": await client.get(f"/items/{item}"),
                "thumbnail": await client.get(f"/items/{item}/thumbnail"),
                "health": await client.get("/health"),
                "metrics": await client.get("/metrics"),
            }
        for route, response in responses.items():
            assert response.status_code == 503, (route, response.status_code, response.text)
            assert response.json() == {"error": STORE_UNAVAILABLE}, route
            assert response.headers["retry-after"] == "5", route
        server = build_mcp_server(Queries(core, FetchPolicy.from_settings(settings), Metrics()))
        for tool, arguments in (
            ("search", {"query": "a red square"}),
            ("find_similar", {"item_id": item}),
            ("get_item", {"item_id": item}),
            ("index_status", {}),
        ):
            result = await call(server, tool, **arguments)
            assert result.is_error and text_of(result).endswith(STORE_UNAVAILABLE), (tool, text_of(result))
        assert "malformed" in caplog.text  # the log keeps SQLite's own words
    finally:
        core.reader.close()


async def test_an_unexpected_error_is_a_500_that_tells_nothing(
    world: tuple[Core, Sample], http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail /srv/catalog")

    monkeypatch.setattr(world[0].search, "search", broken)
    response = await http.get("/search", params={"query": "x"})
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    assert "secret" not in response.text and "internal error" in response.json()["error"]


# -- reasons ------------------------------------------------------------------------------------------------


async def test_index_status_and_items_show_reasons_without_absolute_paths_or_query_strings(
    world: tuple[Core, Sample], mcp: Any, http: httpx.AsyncClient
) -> None:
    core, _ = world
    status = (await call(mcp, "index_status")).structured_content
    assert status is not None
    reasons = {d["item_id"]: d["reason"] for d in status["recent_dead_letters"]}
    assert reasons["kafka:sku-1"] == "SourceNotFound: …/sku-1.jpg: no such file"
    assert reasons["kafka:signed"] == "FetchFailed: https://bucket.s3.amazonaws.com/cat.jpg?…: HTTP 503"
    assert reasons["folder:x.jpg"] == "ImageRejected: …/x.jpg: not an image"
    assert "10.1.2.3" not in reasons["kafka:ten"]
    for item_id in reasons:
        shown = (await call(mcp, "get_item", item_id=item_id)).structured_content
        assert shown is not None and shown["reason"] == reasons[item_id]
        over_http = (await http.get(f"/items/{item_id}")).json()
        assert over_http["reason"] == reasons[item_id]
    assert_discloses_nothing(json.dumps(status), core)


async def test_index_status_and_items_say_which_dead_letters_are_retried_and_when(
    mcp: Any, http: httpx.AsyncClient
) -> None:
    status = (await call(mcp, "index_status")).structured_content
    assert status is not None and status["dead_letters_retrying"] == 1
    letters = {d["item_id"]: d for d in status["recent_dead_letters"]}
    signed, missing = letters["kafka:signed"], letters["kafka:sku-1"]
    assert (signed["retriable"], signed["attempts"], signed["retry_at"]) == (True, 2, "2030-01-01T12:00:00Z")
    assert (missing["retriable"], missing["attempts"], missing["retry_at"]) == (False, 1, None)
    assert (await http.get("/items/kafka:signed")).json()["retriable"] is True
    assert (await http.get("/items/kafka:sku-1")).json()["retriable"] is False


# -- the Redactor itself --------------------------------------------------------------------------------------


@pytest.fixture
def redactor() -> Redactor:
    return Redactor(hidden=("/srv/images", "/var/lib/clipdex"))


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("/srv/images/cats/tom.jpg: no such file", "…/cats/tom.jpg: no such file"),  # relative to a root
        ("/home/me/photos/tom.jpg: no such file", "…/tom.jpg: no such file"),
        ("outside the allowed roots (/srv/images, /var/lib/clipdex)", "outside the allowed roots (…, …)"),
        ("/srv/images2/a.jpg", "…/a.jpg"),
        ("cats/tom.jpg: no such file", "cats/tom.jpg: no such file"),
        (f"{SIGNED}: HTTP 403", "https://bucket.s3.amazonaws.com/cat.jpg?…: HTTP 403"),
        ("http://user:pw@cdn.example.com/a.jpg#frag", "http://cdn.example.com/a.jpg"),
        ("file:///srv/images/a%20b.jpg", "file://…/a%20b.jpg"),
        ("resolves to 169.254.169.254, refused", "resolves to <internal address>, refused"),
        (
            "http://[fd00::1]:8080/x.jpg and 192.168.1.20",
            "http://[<internal address>]:8080/x.jpg and <internal address>",
        ),
        ("version 1.2.3.4.5 and 8.8.8.8", "version 1.2.3.4.5 and 8.8.8.8"),
    ],
)
def test_a_reason_shows_no_absolute_path_query_string_or_internal_address(
    redactor: Redactor, text: str, shown: str
) -> None:
    assert redactor.reason(text) == shown


def test_an_error_loses_the_text_of_the_library_error_it_wraps(redactor: Redactor) -> None:
    def wrapped(error: Exception, cause: Exception) -> Exception:
        error.__cause__ = cause
        return error

    binascii_error = ValueError("Incorrect padding")
    cases = [
        (
            wrapped(InvalidRequest("image_base64 is not valid base64 (Incorrect padding); send it"), binascii_error),
            "image_base64 is not valid base64; send it",
        ),
        (
            wrapped(
                ImageRejected("corrupt image header: cannot identify image file <_io.BytesIO>"),
                OSError("cannot identify image file <_io.BytesIO>"),
            ),
            "corrupt image header",
        ),
        (
            wrapped(SourceNotFound("http://h/x: invalid URL (Invalid port: ':1')"), ValueError("Invalid port: ':1'")),
            "http://h/x: invalid URL",
        ),
        (wrapped(InvalidRequest("a: b"), ValueError("b")), "a"),
        (wrapped(InvalidRequest("about a bee"), ValueError("a")), "about a bee"),  # only whole segments go
    ]
    for error, shown in cases:
        assert redactor.error(error) == shown  # type: ignore[arg-type]


def test_errors_whose_text_is_the_servers_business_get_a_fixed_text(redactor: Redactor) -> None:
    assert "store" in redactor.error(StoreError("store read failed (/var/lib/clipdex/clipdex.sqlite3): locked"))
    assert "/var" not in redactor.error(StoreError("store read failed (/var/lib/clipdex/clipdex.sqlite3)"))
    fetch = redactor.error(FetchFailed("http://10.0.0.5:6379/x: ConnectError: [Errno 111] Connection refused"))
    assert "could not be fetched" in fetch and "6379" not in fetch and "Errno" not in fetch
    root = redactor.error(PathNotAllowed("/etc/passwd: outside the allowed roots (/srv/images)"))
    assert root == "…/passwd: outside the allowed roots (…)"


def test_a_redactor_for_a_server_hides_its_roots_and_data_directory(tmp_path: Path) -> None:
    settings = tiny_settings_for(tmp_path / "data", allowed_roots=[str(tmp_path / "images")])
    redactor = Redactor.for_settings(settings, extra_roots=[tmp_path / "watched"])
    for hidden in ("images", "data", "watched"):
        assert str(tmp_path) not in redactor.reason(f"{tmp_path / hidden} is here")


def test_base64_errors_name_what_to_send(redactor: Redactor) -> None:
    from tools.queries import decode_base64

    with pytest.raises(InvalidRequest) as caught:
        decode_base64(base64.b64encode(b"abc").decode()[:-1], 100)
    assert redactor.error(caught.value).startswith("image_base64 is not valid base64")
