"""The web UI in a real browser: Debian's Chromium, driven by Playwright, against real `clipdex serve`
processes searching generated shape images with the trained shapes model.

One collection is indexed once (`clipdex index`) and served twice: without a token and with one. Every
result is checked through its item id, whose file name says what the image shows (`red-circle-00003.jpg`).
Screenshots and the measured figures are written to test-artifacts/web-ui/ (TEST_ARTIFACTS_DIR).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from clipdex import synthetic
from shared.roles import Failure, Upsert
from shared.sqlite.store import SqliteStore
from tests.brokers import free_port, stop_process
from tests.conftest import SHAPES_MODELS, clipdex_command

pytestmark = [pytest.mark.integration, pytest.mark.browser]

playwright_sync = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, Request, expect  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright's own browser download is not used
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MODELS = SHAPES_MODELS
TOKEN = "ui-test-token-7c41d9"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR") or ROOT / "test-artifacts") / "web-ui"
WAIT_MS = 30_000  # two servers, an indexer and a browser share two cores
PAGE = 24  # results per page (tools/web/api.js PAGE_SIZE)
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

# Dead letters written straight into the store: their reasons hold what the page must never show.
SECRET_QUERY = "sig=SECRET123"
SECRET_DIR = "/srv/private-catalog/2026"


def what(item_id: str) -> tuple[str, str]:
    """(colour, shape) from an item id like folder:images/red-circle-00003.jpg."""
    colour, shape, _ = item_id.rsplit("/", 1)[-1].split("-", 2)
    return colour, shape


@dataclass(frozen=True)
class Served:
    open_url: str
    token_url: str
    token_log: Path
    items: int


def _env(data: Path, root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPDEX_")}
    return env | {
        "CLIPDEX_DATA_DIR": str(data),
        "CLIPDEX_MODEL": "clipdex-shapes",
        "CLIPDEX_PRETRAINED": str(MODELS / "clipdex-shapes.safetensors"),
        "CLIPDEX_MODEL_CONFIGS": str(MODELS),
        "CLIPDEX_DEVICE": "cpu",
        "CLIPDEX_ALLOWED_ROOTS": str(root),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }


def _label(data: Path) -> None:
    """Label every item with its colour and shape (for the filters), and add two dead letters whose reasons
    carry a URL query string and a private path."""
    with SqliteStore(data / "clipdex.sqlite3") as store:
        labelled = []
        for item in store.items():
            if item.status == "indexed":
                colour, shape = what(item.id)
                metadata = {**item.metadata, "colour": colour, "shape": shape}
                labelled.append(Upsert(item.id, item.source, item.uri, item.sha256 or "", metadata, None))
        failures = [
            Failure(
                "kafka",
                '{"op": "upsert", "id": "sku-9"}',
                f"FetchFailed: https://cdn.example.com/sku-9.jpg?{SECRET_QUERY}: HTTP 503",
                id="kafka:sku-9",
            ),
            Failure("kafka", '{"op": "upsert", "id": "sku-10"}', f"SourceNotFound: {SECRET_DIR}/x.jpg: no such file"),
        ]
        store.apply(upserts=labelled, failures=failures)


def _wait_until(url: str, proc: subprocess.Popen[bytes], log: Path, ready: Any, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the clipdex process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            status = httpx.get(f"{url}/status", headers=headers, timeout=2)
            if status.status_code == 200 and ready(status.json()):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"clipdex did not get ready:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`clipdex run` (no token) indexes the folder and serves it; `clipdex serve` (with a token) follows
    the same store. Both start at once, so model loads and indexing overlap."""
    base = tmp_path_factory.mktemp("web-ui")
    root, data = base / "images", base / "data"
    written = synthetic.write_folder(root, 30, 501, size=160, colours=["red"], shapes=["circle"])
    written += synthetic.write_folder(root, 30, 502, size=160, colours=["blue"], shapes=["square"], start=30)
    written += synthetic.write_folder(root, 60, 503, size=160, start=60)
    (root / "broken-file-00999.jpg").write_bytes(b"not an image at all")
    env = _env(data, root)
    commands = {
        "open": (["run", str(root)], {}),
        "token": (["serve"], {"CLIPDEX_API_TOKEN": TOKEN, "CLIPDEX_LOG_LEVEL": "DEBUG"}),
    }
    with ExitStack() as stack:
        started = {}
        for name, (args, extra) in commands.items():
            port = free_port()
            log = base / f"{name}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [*clipdex_command(), *args, "--port", str(port)], env=env | extra, stdout=out, stderr=out
                )
            stack.callback(stop_process, proc, 15)
            started[name] = (f"http://127.0.0.1:{port}", proc, log)
        # SIGTERM to both at once, then wait for each: they shut down side by side
        stack.callback(lambda: [p.terminate() for _, p, _ in started.values() if p.poll() is None])
        items = len(written)
        url, proc, log = started["open"]
        _wait_until(url, proc, log, lambda st: st["items"] == items and st["dead_letters"] == 1, {})
        _label(data)
        for name, headers in (("open", {}), ("token", {"authorization": f"Bearer {TOKEN}"})):
            url, proc, log = started[name]
            _wait_until(url, proc, log, lambda st: st["items"] == items and st["pending_changes"] == 0, headers)
        yield Served(started["open"][0], started["token"][0], started["token"][2], items)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    with playwright_sync.sync_playwright() as pw:
        # launch() gives every run a fresh, temporary user-data-dir
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Tab:
    """A page in its own browser context (its own cache and sessionStorage), with what it logged."""

    page: Page
    context: BrowserContext
    errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def assert_no_console_errors(self, *allowed: str) -> None:
        unexpected = [e for e in self.errors if not any(a in e for a in allowed)]
        assert not unexpected, unexpected


@pytest.fixture
def tabs(served: Served, browser: Browser) -> Iterator[Any]:
    # `served` first: the servers then stop after the browser has closed its keep-alive connections,
    # instead of waiting for them.
    opened: list[Tab] = []

    def open_tab(url: str = served.open_url, viewport: dict[str, int] = DESKTOP, scheme: str = "light") -> Tab:
        context = browser.new_context(base_url=url, viewport=viewport, color_scheme=scheme)  # type: ignore[arg-type]
        context.set_default_timeout(WAIT_MS)
        tab = Tab(context.new_page(), context)

        def console(message: ConsoleMessage) -> None:
            if message.type == "error":
                tab.errors.append(message.text)

        tab.page.on("console", console)
        tab.page.on("pageerror", lambda exc: tab.errors.append(f"uncaught: {exc}"))
        tab.page.on("request", lambda request: tab.requests.append(request))
        opened.append(tab)
        return tab

    expect.set_options(timeout=WAIT_MS)
    yield open_tab
    for tab in opened:
        tab.context.close()


def search(page: Page, text: str) -> None:
    box = page.locator("input[type=search]")
    box.fill(text)
    box.press("Enter")
    wait_for_results(page)


def wait_for_results(page: Page, at_least: int = 1) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('[data-item-id]').length >= n"
        " && !document.getElementById('results').hasAttribute('aria-busy')",
        arg=at_least,
    )


def result_ids(page: Page) -> list[str]:
    return page.locator("[data-item-id]").evaluate_all("els => els.map(e => e.dataset.itemId)")


def first_row_loaded(page: Page) -> None:
    """Wait until every thumbnail of the first row is decoded."""
    page.wait_for_function(
        """() => {
            const items = [...document.querySelectorAll('[data-item-id]')];
            if (!items.length) return false;
            const row = items.filter(i => i.offsetTop === items[0].offsetTop);
            return row.every(i => i.querySelector('.thumb.loaded img')?.naturalWidth > 0);
        }"""
    )


def png_of(colour: str, shape: str, seed: int) -> bytes:
    sample = synthetic.render_sample(random.Random(seed), 256, colour=colour, shape=shape)
    out = io.BytesIO()
    sample.image.save(out, format="PNG")
    return out.getvalue()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


# -- search -----------------------------------------------------------------------------------------------


def test_typing_a_red_circle_shows_red_circles_with_thumbnails_and_scores(tabs: Any) -> None:
    tab = tabs()
    page = tab.page
    page.goto("/")
    expect(page.locator("#empty")).to_contain_text("Find images by describing them")
    search(page, "a red circle")
    ids = result_ids(page)
    assert len(ids) >= 5
    assert {what(i) for i in ids} == {("red", "circle")}, ids
    assert "query=a+red+circle" in page.url
    first_row_loaded(page)
    first = page.locator("[data-item-id]").first
    first.hover()
    expect(first.locator(".score")).to_be_visible()
    assert float(first.locator(".score").inner_text()) > 0
    alts = page.locator("[data-item-id] img").evaluate_all("els => els.map(e => e.alt)")
    assert all(alt.strip() for alt in alts)
    expect(page.locator("#summary")).to_contain_text(f"{len(ids)} results for “a red circle”")
    screenshot(page, "desktop-light-results.png")
    tab.assert_no_console_errors()


def test_more_results_follows_the_cursor_to_the_end_without_repeats(tabs: Any) -> None:
    tab = tabs()
    page = tab.page
    page.goto("/?query=a+circle")
    wait_for_results(page)
    assert len(result_ids(page)) == PAGE
    more = page.get_by_role("button", name="More results")
    pages = 1
    while more.is_visible():  # 120 images: five pages, the last one short, then no button
        more.click()
        pages += 1
        wait_for_results(page, min(pages * PAGE, 120))
        assert pages <= 5
    ids = result_ids(page)
    assert len(ids) == 120 == len(set(ids)) and pages == 5
    searches = [r.url for r in tab.requests if "/search?" in r.url]
    assert "cursor=" not in searches[0] and all("cursor=" in u and "top_k=24" in u for u in searches[1:])
    tab.assert_no_console_errors()


def test_more_like_this_on_a_blue_square_shows_blue_squares(tabs: Any) -> None:
    tab = tabs()
    page = tab.page
    page.goto("/")
    search(page, "a blue square")
    square = result_ids(page)[0]
    assert what(square) == ("blue", "square")
    page.locator("[data-item-id] button").first.click()
    panel = page.locator("#detail")
    expect(panel).to_be_visible()
    expect(panel).to_contain_text(square)
    expect(panel).to_contain_text("sha256:")  # from /items/{id}: content hash, when it was indexed
    expect(panel.locator("#detail-img")).to_have_attribute("src", re.compile(r"^blob:"))
    panel.get_by_role("button", name="More like this").click()
    page.wait_for_url("**/?like=*")
    wait_for_results(page, PAGE)
    ids = result_ids(page)
    assert square not in ids
    assert {what(i) for i in ids} == {("blue", "square")}, ids
    expect(page.locator("#context")).to_contain_text(f"Images like {square}")
    tab.assert_no_console_errors()


def test_choosing_dropping_or_pasting_an_image_finds_images_like_it(tabs: Any) -> None:
    tab = tabs()
    page = tab.page
    page.goto("/")
    page.locator("input[type=file]").set_input_files(
        files=[{"name": "mine.png", "mimeType": "image/png", "buffer": png_of("blue", "square", 7001)}]
    )
    wait_for_results(page, PAGE)
    assert {what(i) for i in result_ids(page)} == {("blue", "square")}
    expect(page.locator("#context")).to_contain_text("Images like your image (mine.png)")

    for event in ("drop", "paste"):
        data = base64.b64encode(png_of("red", "circle", 7002 if event == "drop" else 7003)).decode()
        page.evaluate(
            """([event, data]) => {
                const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], `${event}.png`, {type: "image/png"}));
                if (event === "drop") {
                    document.body.dispatchEvent(new DragEvent("dragenter", {dataTransfer: transfer, bubbles: true}));
                    document.body.dispatchEvent(
                        new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
                } else {
                    document.body.dispatchEvent(
                        new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true}));
                }
            }""",
            [event, data],
        )
        expect(page.locator("#context")).to_contain_text(f"({event}.png)")
        wait_for_results(page, PAGE)
        assert {what(i) for i in result_ids(page)} == {("red", "circle")}, event
    expect(page.locator("#drop")).to_be_hidden()
    tab.assert_no_console_errors()


def test_filters_narrow_the_results_and_live_in_the_url(tabs: Any) -> None:
    tab = tabs()
    page = tab.page
    page.goto("/?query=a+square")
    wait_for_results(page, PAGE)
    assert len({what(i)[0] for i in result_ids(page)}) > 1, "a square of every colour"

    page.get_by_role("button", name="Filters", exact=True).click()
    page.locator("#f-meta").fill("colour=blue")
    page.locator("#f-meta").press("Enter")
    page.wait_for_url("**filter.colour=blue**")
    wait_for_results(page)
    blue = result_ids(page)
    assert blue and {what(i)[0] for i in blue} == {"blue"}
    expect(page.locator("#f-meta-list")).to_contain_text("colour = blue")

    scores = [float(s) for s in page.locator("[data-item-id] .score").all_inner_texts()]
    cut = statistics.median(scores)
    page.locator("#f-min").fill(f"{cut:.3f}")
    page.locator("#f-min").press("Enter")
    page.wait_for_url(f"**min_score={cut:.3f}**")
    wait_for_results(page)
    fewer = [float(s) for s in page.locator("[data-item-id] .score").all_inner_texts()]
    assert 0 < len(fewer) < len(scores) and min(fewer) >= round(cut, 3) - 1e-3
    expect(page.locator("#filter-count")).to_have_text("2")

    page.locator("#f-meta").fill("colour=no-such-colour")
    page.locator("#f-meta").press("Enter")
    expect(page.locator("#none")).to_contain_text("No images match these filters")
    page.get_by_role("button", name="Clear filters").click()
    wait_for_results(page, PAGE)
    assert len({what(i)[0] for i in result_ids(page)}) > 1
    tab.assert_no_console_errors()


def test_the_back_button_restores_the_previous_search(tabs: Any) -> None:
    tab = tabs()
    page = tab.page
    page.goto("/")
    search(page, "a red circle")
    search(page, "a green triangle")
    assert what(result_ids(page)[0]) == ("green", "triangle")
    page.go_back()
    expect(page.locator("input[type=search]")).to_have_value("a red circle")
    page.wait_for_function("() => document.querySelector('[data-item-id]')?.dataset.itemId.includes('red-circle')")
    wait_for_results(page, PAGE)
    assert {what(i) for i in result_ids(page)} == {("red", "circle")}
    page.go_forward()
    expect(page.locator("input[type=search]")).to_have_value("a green triangle")
    page.go_back()
    page.go_back()
    expect(page.locator("#empty")).to_be_visible()
    tab.assert_no_console_errors()


def test_a_shared_link_opened_from_another_site_shows_the_search(tabs: Any, served: Served) -> None:
    """A link in a chat or a mail is a cross-site navigation (Sec-Fetch-Site: cross-site): the page and
    what it then fetches itself (same-origin) must work."""
    tab = tabs()
    page = tab.page
    shared = f"{served.open_url}/?query=a+red+circle&filter.shape=circle"
    page.goto(f"data:text/html,<a href='{shared}'>a red circle</a>")
    with page.expect_navigation():
        page.click("a")
    wait_for_results(page, PAGE)
    assert {what(i) for i in result_ids(page)} == {("red", "circle")}
    navigation = next(r for r in tab.requests if r.url == shared)
    assert navigation.all_headers().get("sec-fetch-site") == "cross-site"
    tab.assert_no_console_errors()


def test_errors_are_shown_in_words(tabs: Any) -> None:
    tab = tabs()
    page = tab.page
    page.goto("/?query=a+red+circle&min_score=5")
    expect(page.get_by_role("alert")).to_contain_text("min_score is a cosine similarity and must be between -1 and 1")
    page.locator("input[type=search]").fill("   ")
    page.locator("input[type=search]").press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("Type what you are looking for first")
    # the server's 400 shows up in the console as a failed resource; it is the point of this test
    tab.assert_no_console_errors("status of 400")


# -- keyboard, access -------------------------------------------------------------------------------------


def test_keyboard_slash_arrows_enter_escape(tabs: Any) -> None:
    tab = tabs()
    page = tab.page
    page.goto("/")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.type") == "search"
    page.keyboard.type("a red circle")
    page.keyboard.press("Enter")
    wait_for_results(page, PAGE)

    def focused() -> dict[str, Any]:
        return page.evaluate(
            """() => {
                const li = document.activeElement.closest('[data-item-id]');
                const style = getComputedStyle(document.activeElement);
                return li && {id: li.dataset.itemId, left: li.offsetLeft, top: li.offsetTop,
                              outline: parseFloat(style.outlineWidth), outlineStyle: style.outlineStyle};
            }"""
        )

    page.keyboard.press("ArrowDown")  # from the search box into the results
    start = focused()
    ids = result_ids(page)
    assert start["id"] == ids[0]
    assert start["outline"] >= 2 and start["outlineStyle"] != "none", "focus is visible"
    page.keyboard.press("ArrowRight")
    second = focused()
    assert second["id"] == ids[1]
    page.keyboard.press("ArrowDown")
    below = focused()
    assert below["left"] == second["left"] and below["top"] > second["top"]
    page.keyboard.press("ArrowLeft")
    chosen = focused()["id"]
    page.keyboard.press("Enter")
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#detail")).to_contain_text(chosen)
    page.keyboard.press("Escape")
    expect(page.locator("#detail")).to_be_hidden()
    assert focused()["id"] == chosen, "focus returns to the result"
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.type") == "search"
    tab.assert_no_console_errors()


CONTRAST_JS = """() => {
    const parse = (text) => {
        const m = text.match(/rgba?\\(([^)]+)\\)/);
        if (m) {
            const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
            return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
        }
        const c = text.match(/color\\(srgb ([^)]+)\\)/);
        if (c) {
            const p = c[1].split(/[\\s\\/]+/).filter(Boolean).map(Number);
            return [p[0] * 255, p[1] * 255, p[2] * 255, p.length > 3 ? p[3] : 1];
        }
        return null;
    };
    const over = (top, below) => [0, 1, 2].map(i => top[i] * top[3] + below[i] * (1 - top[3])).concat(1);
    const luminance = (rgb) => {
        const [r, g, b] = rgb.slice(0, 3).map(v => {
            v /= 255;
            return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
        });
        return 0.2126 * r + 0.7152 * g + 0.0722 * b;
    };
    const backdrop = (el) => {
        const layers = [];
        for (let n = el; n; n = n.parentElement) {
            const c = parse(getComputedStyle(n).backgroundColor);
            if (c && c[3] > 0) { layers.push(c); if (c[3] >= 1) break; }
        }
        return layers.reverse().reduce((below, layer) => over(layer, below), [255, 255, 255, 1]);
    };
    const seen = (el) => {
        for (let n = el; n; n = n.parentElement) if (parseFloat(getComputedStyle(n).opacity) === 0) return false;
        return el.checkVisibility();
    };
    const failures = [];
    let checked = 0;
    for (const el of document.querySelectorAll('body *')) {
        const text = [...el.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim();
        if (!text || !seen(el)) continue;
        const style = getComputedStyle(el);
        const bg = backdrop(el);
        const fg = over(parse(style.color), bg);
        const [hi, lo] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
        const ratio = (hi + 0.05) / (lo + 0.05);
        const size = parseFloat(style.fontSize);
        const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
        checked += 1;
        if (ratio < (large ? 3 : 4.5)) {
            failures.push(`${el.tagName}#${el.id}.${el.className} "${text.slice(0, 40)}": ${ratio.toFixed(2)}`);
        }
    }
    return {checked, failures};
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_text_contrast_passes_wcag_aa_and_the_page_fits_a_phone(tabs: Any, scheme: str) -> None:
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        tab = tabs(viewport=viewport, scheme=scheme)
        page = tab.page
        page.goto("/?query=a+red+circle&min_score=0.1")
        wait_for_results(page, PAGE)
        first_row_loaded(page)
        expect(page.locator("#health")).to_contain_text("items")
        page.locator("[data-item-id]").nth(1).hover()
        page.locator("[data-item-id] button").first.click()
        expect(page.locator("#detail")).to_contain_text("sha256:")
        if name == "phone":
            box = page.locator("#detail").bounding_box()
            assert box is not None and (box["width"], box["height"]) == (PHONE["width"], PHONE["height"])
        screenshot(page, f"{name}-{scheme}-detail.png")
        contrast = page.evaluate(CONTRAST_JS)
        assert contrast["checked"] > 20 and not contrast["failures"], contrast["failures"]
        page.get_by_role("button", name="Close (Esc)").click()
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{name}: the page is {overflow} px wider than the window"
        screenshot(page, f"{name}-{scheme}-results.png")
        page.get_by_role("button", name="dead letters").click()
        expect(page.locator("#dead-dialog")).to_contain_text("no such file")
        contrast = page.evaluate(CONTRAST_JS)
        assert not contrast["failures"], contrast["failures"]
        tab.assert_no_console_errors()


# -- index health -----------------------------------------------------------------------------------------


def test_health_strip_and_the_read_only_dead_letters_view(tabs: Any, served: Served) -> None:
    tab = tabs()
    page = tab.page
    page.goto("/")
    health = page.locator("#health")
    expect(health).to_contain_text(f"{served.items} items")
    expect(health).to_contain_text("3 dead letters")  # the broken file and the two written into the store
    expect(health).to_contain_text("model clipdex-shapes")
    expect(health).to_contain_text("delta")
    expect(health).to_contain_text("up to date")
    page.get_by_role("button", name="3 dead letters").click()
    dialog = page.locator("#dead-dialog")
    expect(dialog).to_be_visible()
    rows = dialog.locator("tbody tr")
    expect(rows).to_have_count(3)
    text = dialog.inner_text()
    assert "folder:images/broken-file-00999.jpg" in text and "not an image" in text
    assert "https://cdn.example.com/sku-9.jpg?…" in text and "…/x.jpg: no such file" in text
    assert SECRET_QUERY not in text and SECRET_DIR not in text
    assert dialog.get_by_role("button").count() == 1, "read-only: the only button closes it"
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(page.locator("#empty-index")).to_be_hidden()
    tab.assert_no_console_errors()

    # an empty index (the same server's answer, with no items) says how to fill it
    def no_items(route: Any) -> None:
        route.fulfill(response=route.fetch(), json={**route.fetch().json(), "items": 0})

    page.route("**/status", no_items)
    page.reload()
    expect(page.locator("#empty-index")).to_contain_text("Nothing is indexed yet")
    expect(health).to_contain_text("0 items")


# -- the token --------------------------------------------------------------------------------------------


def test_with_a_token_the_page_asks_once_and_never_puts_it_in_a_url(tabs: Any, served: Served) -> None:
    tab = tabs(served.token_url)
    page = tab.page
    page.goto("/")
    prompt = page.locator("#token-dialog")
    expect(prompt).to_be_visible()
    expect(prompt).to_contain_text("needs its access token")
    page.locator("#token-input").fill("not-the-token")
    page.locator("#token-input").press("Enter")
    expect(page.locator("#token-error")).to_contain_text("The server refused that token")
    expect(prompt).to_be_visible()
    page.locator("#token-input").fill(TOKEN)
    page.locator("#token-input").press("Enter")
    expect(prompt).to_be_hidden()
    expect(page.locator("#health")).to_contain_text(f"{served.items} items")

    search(page, "a red circle")
    first_row_loaded(page)
    sources = page.locator("[data-item-id] .thumb.loaded img").evaluate_all("els => els.map(e => e.src)")
    assert sources and all(s.startswith("blob:") for s in sources)

    page.reload()  # kept for the tab: no second prompt
    wait_for_results(page, PAGE)
    first_row_loaded(page)
    assert not prompt.is_visible()

    with_token = list(tab.requests)
    page.evaluate("sessionStorage.setItem('clipdex.token', 'an-old-token')")
    page.reload()
    expect(page.locator("#token-error")).to_contain_text("no longer accepts the saved token")
    page.locator("#token-input").fill(TOKEN)
    page.locator("#token-input").press("Enter")
    wait_for_results(page, PAGE)

    api = [r for r in with_token if "/search" in r.url or "/thumbnail" in r.url]
    assert api and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api)
    assert not [r.url for r in tab.requests if TOKEN in r.url]
    assert TOKEN not in served.token_log.read_text(), "the token is in the server's log"
    assert "query=a+red+circle" in served.token_log.read_text(), "the access log is on (DEBUG)"
    tab.assert_no_console_errors("status of 401")


# -- figures ----------------------------------------------------------------------------------------------


def test_first_load_bytes_and_time_from_enter_to_the_first_row(tabs: Any) -> None:
    """The figures for bench/RESULTS.md, written to test-artifacts/web-ui/figures.json. Only the size is
    asserted: timings on two shared cores are noise."""
    tab = tabs()
    page = tab.page
    page.goto("/")
    expect(page.locator("#health")).to_contain_text("items")
    loaded = page.evaluate(
        """() => [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')]
                 .filter(e => !e.name.includes('/thumbnail'))
                 .map(e => ({url: e.name, bytes: e.transferSize}))"""
    )
    first_load = sum(e["bytes"] for e in loaded)
    assert first_load < 100_000, loaded
    timings = []
    for query in ("a yellow triangle", "an orange cross", "a purple circle"):
        fresh = tabs()
        fresh.page.goto("/")
        expect(fresh.page.locator("#health")).to_contain_text("items")
        search(fresh.page, query)
        first_row_loaded(fresh.page)
        fresh.page.wait_for_function("() => performance.getEntriesByName('clipdex:first-row').length > 0")
        timings.append(
            fresh.page.evaluate(
                """() => {
                    const start = performance.getEntriesByName('clipdex:search', 'mark')[0].startTime;
                    const search = performance.getEntriesByType('resource').find(e => e.name.includes('/search?'));
                    return {first_row_ms: performance.getEntriesByName('clipdex:first-row')[0].duration,
                            search_answered_ms: search.responseEnd - start};
                }"""
            )
        )
        fresh.assert_no_console_errors()
    figures = {
        "first_load_bytes": first_load,
        "first_load": loaded,
        "enter_to_first_row_ms": [round(t["first_row_ms"], 1) for t in timings],
        "enter_to_first_row_median_ms": round(statistics.median(t["first_row_ms"] for t in timings), 1),
        "enter_to_search_answer_ms": [round(t["search_answered_ms"], 1) for t in timings],
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps({k: v for k, v in figures.items() if k != "first_load"}))
    tab.assert_no_console_errors()
