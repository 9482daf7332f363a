"""The web UI's server side, in process: its files (served, open without the token, packaged in the wheel)
and the two endpoints only it needed, /status and /dead-letters. The page itself is tested in a real
browser in tests/integration/test_web_ui.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import AsyncIterator, Iterator
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from shared.core import Core, build_core
from shared.embedder import Embedder
from shared.roles import Failure
from shared.stores import open_writer
from tests.conftest import tiny_settings_for
from tests.sample_store import Sample, fill_store
from tools import ui
from tools.app import build_app

ROOT = Path(__file__).resolve().parents[3]
WEB = ROOT / "tools" / "web"
BASE = "http://127.0.0.1:8765"
TOKEN = "s3cret-ui"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_embedder: Embedder) -> Iterator[tuple[Core, Sample]]:
    base = tmp_path_factory.mktemp("ui")
    settings = tiny_settings_for(base / "data", allowed_roots=[str(base / "images")])
    with open_writer(settings, tiny_embedder.identity) as store:
        catalog = fill_store(store.writer, tiny_embedder, base / "images")
        store.writer.apply(
            failures=[
                Failure("kafka", "{}", "FetchFailed: https://cdn.example.com/a/b.jpg?X-Amz-Signature=abc123: HTTP 503"),
                Failure(
                    "folder", "/srv/private/2026/cat.jpg", "ImageRejected: /srv/private/2026/cat.jpg: not an image"
                ),
            ]
        )
    core = build_core(settings, embedder=tiny_embedder)
    yield core, catalog
    core.reader.close()  # not core.close(): the embedder is the session's


def client(core: Core, token: str | None = None) -> httpx.AsyncClient:
    settings = core.settings.model_copy(update={"api_token": SecretStr(token) if token else None})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(core, settings)), base_url=BASE)


@pytest.fixture
async def open_client(world: tuple[Core, Sample]) -> AsyncIterator[httpx.AsyncClient]:
    async with client(world[0]) as c:
        yield c


# -- the files --------------------------------------------------------------------------------------------


async def test_the_page_and_its_files_are_served_with_types_etags_and_a_strict_policy(
    open_client: httpx.AsyncClient,
) -> None:
    page = await open_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'data-auth="none"' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["referrer-policy"] == "no-referrer"
    for name, media_type in ui.ASSETS.items():
        asset = await open_client.get(f"/ui/{name}")
        assert asset.status_code == 200, name
        assert asset.headers["content-type"] == media_type
        assert asset.content == (WEB / name).read_bytes()
        again = await open_client.get(f"/ui/{name}", headers={"if-none-match": asset.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
    missing = await open_client.get("/ui/..%2Fsearch")
    assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]
    assert (await open_client.get("/ui/secret.py")).status_code == 404


async def test_with_a_token_the_page_is_open_and_asks_for_it_but_the_data_is_not(
    world: tuple[Core, Sample],
) -> None:
    async with client(world[0], TOKEN) as c:
        page = await c.get("/")
        assert page.status_code == 200 and 'data-auth="bearer"' in page.text
        for name in ui.ASSETS:
            assert (await c.get(f"/ui/{name}")).status_code == 200
        for path in ("/status", "/dead-letters", "/search?query=x", "/ui/unknown.js", "/ui/..%2Fstatus"):
            assert (await c.get(path)).status_code == 401, path
        authorized = await c.get("/status", headers={"authorization": f"Bearer {TOKEN}"})
        assert authorized.status_code == 200


async def test_the_page_answers_only_to_its_own_host_and_origin(open_client: httpx.AsyncClient) -> None:
    assert (await open_client.get("/", headers={"host": "evil.example"})).status_code == 421
    assert (await open_client.get("/ui/app.js", headers={"origin": "http://evil.example"})).status_code == 403


def test_the_page_loads_nothing_from_elsewhere_and_names_only_served_files() -> None:
    html = (WEB / ui.PAGE).read_text(encoding="utf-8")
    linked = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert linked and all(link.startswith(("/ui/", "#")) or link == "/" for link in linked), linked
    assert {link.removeprefix("/ui/") for link in linked if link.startswith("/ui/")} <= set(ui.ASSETS)
    for name in ui.ASSETS:
        text = (WEB / name).read_text(encoding="utf-8")
        imports = re.findall(r'from "([^"]+)"', text)
        assert all(i.startswith("./") and i[2:] in ui.ASSETS for i in imports), imports
        assert not re.search(r"(?:src|href|url)\s*[=(]\s*[\"']?(?:https?:)?//", text), f"{name} loads from elsewhere"
        html_sinks = r"\.(?:inner|outer)HTML\s*\+?=|insertAdjacentHTML|document\.write|\beval\("
        assert not re.search(html_sinks, text), f"{name}: use textContent (ids and metadata are untrusted)"


def test_every_web_file_is_served_and_declared_as_package_data() -> None:
    files = {p.name for p in WEB.iterdir() if p.is_file()}
    assert files == {ui.PAGE, *ui.ASSETS}
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"
    ]["tools"]
    assert all(any(fnmatch(f"web/{name}", p) for p in patterns) for name in files)


@pytest.mark.integration
def test_the_wheel_carries_the_web_files(tmp_path: Path) -> None:
    """Built from a copy of the sources, so the checkout gets no build/ or egg-info."""
    src = tmp_path / "src"
    src.mkdir()
    for path in ROOT.iterdir():
        if path.is_dir() and (path / "__init__.py").exists() and path.name != "tests":
            shutil.copytree(path, src / path.name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(tmp_path / "out"), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "out").glob("clipdex-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"tools/web/{name}" for name in (ui.PAGE, *ui.ASSETS)} <= names


# -- /status and /dead-letters ----------------------------------------------------------------------------


async def test_status_is_the_index_status_over_http(open_client: httpx.AsyncClient, world: tuple[Core, Sample]) -> None:
    catalog = world[1]
    status = await open_client.get("/status")
    assert status.status_code == 200
    body = status.json()
    assert body["items"] == catalog.searchable and body["dead_letters"] == 3
    assert body["model"]["name"] == "clipdex-tiny" and body["pending_changes"] == 0
    assert {"delta_size", "generation", "newest_indexed_at", "refreshed_seconds_ago"} <= set(body)
    assert isinstance(body["recent_dead_letters"][0]["id"], int)
    unknown = await open_client.get("/status", params={"verbose": "1"})
    assert unknown.status_code == 400 and "verbose" in unknown.json()["error"]


async def test_dead_letters_newest_first_with_reasons_fit_to_show(open_client: httpx.AsyncClient) -> None:
    response = await open_client.get("/dead-letters")
    assert response.status_code == 200
    letters = response.json()["dead_letters"]
    assert [d["id"] for d in letters] == sorted((d["id"] for d in letters), reverse=True) and len(letters) == 3
    reasons = " ".join(d["reason"] for d in letters)
    assert "https://cdn.example.com/a/b.jpg?…: HTTP 503" in reasons and "abc123" not in reasons
    assert "…/cat.jpg: not an image" in reasons and "/srv/private" not in reasons
    assert "not an image (unrecognised format)" in reasons
    assert set(letters[0]) == {"id", "item_id", "source", "reason", "tries", "at", "retriable", "attempts", "retry_at"}
    assert len((await open_client.get("/dead-letters", params={"limit": 1})).json()["dead_letters"]) == 1


@pytest.mark.parametrize(
    ("limit", "words"),
    [("0", "from 1 to 500"), ("501", "from 1 to 500"), ("many", "whole number"), ("", "whole number")],
)
async def test_dead_letters_refuses_a_bad_limit(open_client: httpx.AsyncClient, limit: str, words: str) -> None:
    response = await open_client.get("/dead-letters", params={"limit": limit})
    assert response.status_code == 400 and words in response.json()["error"]


async def test_status_and_dead_letters_are_in_the_openapi_description(open_client: httpx.AsyncClient) -> None:
    spec = (await open_client.get("/openapi.json")).json()
    assert {"/status", "/dead-letters", "/"} <= set(spec["paths"])
    assert spec["paths"]["/dead-letters"]["get"]["parameters"][0]["name"] == "limit"
    assert "DeadLettersOut" in spec["components"]["schemas"]
