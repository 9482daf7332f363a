"""The read side's operations, shared by the MCP tools and the HTTP API.

Arguments are checked here (so both front doors refuse the same things with the same words), blocking
work (model calls, FAISS, SQLite, file and URL reads, JPEG encoding) runs in worker threads so the event
loop keeps serving, and every call is counted and timed. Failures are shared.errors exceptions; each front
door turns them into its own kind of error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import anyio
import anyio.to_thread
from PIL import Image

from shared.core import Core
from shared.errors import ClipdexError, ImageRejected, InvalidRequest, NotFound
from shared.fetch import FetchPolicy, fetch_bytes, fetch_url, read_path
from shared.images import decode_budget, decode_image, thumbnail_jpeg
from shared.query import MAX_IMAGE_TERMS, ImageTerm, ItemTerm, SearchOptions, Term, TextTerm, check_terms
from shared.roles import DeadLetter
from shared.status import Status, read_status
from shared.types import Item, SearchResult
from tools.metrics import Metrics
from tools.redaction import Redactor
from tools.schemas import IndexStatusOut

logger = logging.getLogger(__name__)

T = TypeVar("T")

THUMBNAIL_SIDE = 256
IMAGE_SIDE = 2048  # an image that is not a JPEG is re-encoded as one, at most this big
UNLIKE_WEIGHT = -0.5  # each `unlike` of GET /search and MCP search (POST /search sets any weight)
MAX_DEAD_LETTERS = 500


@dataclass(frozen=True)
class TermSpec:
    """One term of a query as a caller gives it: exactly one of the fields says what it is, and a weight
    (shared.query has the maths). `image` is uploaded bytes; `text_or_item` is the id of a stored item when
    one has that id, and text otherwise (MCP's `unlike`)."""

    text: str | None = None
    item_id: str | None = None
    image_base64: str | None = None
    path: str | None = None
    url: str | None = None
    image: bytes | None = None
    text_or_item: str | None = None
    weight: float = 1.0

    def only(self) -> tuple[str, str | bytes]:
        given = [(name, value) for name, value in vars(self).items() if name != "weight" and value is not None]
        if len(given) != 1:
            named = ", ".join(name for name, _ in given)
            problem = "none was given" if not given else f"{len(given)} were given ({named})"
            raise InvalidRequest(
                f"each term is exactly one of text, item_id, image_base64, path, url or an uploaded image; {problem}"
            )
        name, value = given[0]
        if isinstance(value, str) and not value.strip() and name != "text":
            raise InvalidRequest(f"{name} is empty")
        return name, value

    @property
    def is_image(self) -> bool:
        return any(v is not None for v in (self.image_base64, self.path, self.url, self.image))


@dataclass(frozen=True)
class ImageSource:
    """Where find_similar's query image comes from: exactly one field is set."""

    item_id: str | None = None
    image_base64: str | None = None
    path: str | None = None
    url: str | None = None

    def only(self) -> tuple[str, str]:
        given = [(name, value) for name, value in vars(self).items() if value is not None]
        if len(given) != 1:
            named = ", ".join(name for name, _ in given)
            problem = "none was given" if not given else f"{len(given)} were given ({named})"
            raise InvalidRequest(
                "give exactly one of item_id (a stored item), image_base64 (image bytes), path (a file under "
                f"an allowed root) or url (on an allowed host); {problem}"
            )
        name, value = given[0]
        if not value.strip():
            raise InvalidRequest(f"{name} is empty")
        return name, value

    def term(self) -> TermSpec:
        self.only()
        return TermSpec(item_id=self.item_id, image_base64=self.image_base64, path=self.path, url=self.url)


class Queries:
    """Search, find-similar, item lookup, thumbnails and status over one Core."""

    def __init__(self, core: Core, policy: FetchPolicy, metrics: Metrics, *, thumbnail_cache: int = 512) -> None:
        self.core = core
        self.policy = policy
        self.metrics = metrics
        self.redactor = Redactor.for_settings(core.settings, extra_roots=policy.roots)  # what clients may read
        self._thumbs: OrderedDict[tuple[str, str | None], bytes] = OrderedDict()
        self._thumbs_max = thumbnail_cache
        self._thumbs_lock = threading.Lock()
        # Model calls and FAISS scans already use every core: dozens of them at once only thrash. A few more
        # threads than cores leave room for the waits (URL fetches, file reads).
        self._workers = max(4, 2 * (os.cpu_count() or 1))
        self._limiter: anyio.CapacityLimiter | None = None
        # Decodes of uploads, URLs and thumbnails share this process's memory budget with its indexer.
        self.decode_budget = decode_budget(core.settings.decode_memory_mb)

    @property
    def max_image_bytes(self) -> int:
        return self.core.settings.max_image_bytes

    # -- searches ---------------------------------------------------------------------------------------

    async def search(self, specs: Sequence[TermSpec], options: SearchOptions, transport: str) -> SearchResult:
        """One page of results for weighted terms (texts, stored items, images from bytes, paths or URLs)."""
        return await self._call(transport, _kind(specs), lambda: self._search(specs, options))

    def _search(self, specs: Sequence[TermSpec], options: SearchOptions) -> SearchResult:
        options.check()
        images = sum(spec.is_image for spec in specs)
        if images > MAX_IMAGE_TERMS:
            raise InvalidRequest(f"at most {MAX_IMAGE_TERMS} images in one query (got {images})")
        check_terms([TextTerm("", spec.weight) for spec in specs])  # counts and weights, before any fetch
        return self.core.search.search([self._term(spec) for spec in specs], options)

    async def search_text(self, query: str, args: SearchOptions, transport: str) -> SearchResult:
        return await self.search([TermSpec(text=query)], args, transport)

    async def similar(self, source: ImageSource, args: SearchOptions, transport: str) -> SearchResult:
        """Items like the one image that `source` names."""
        given = [name for name, value in vars(source).items() if value is not None]
        kind = _KINDS.get(given[0], "similar") if len(given) == 1 else "similar"
        return await self._call(transport, kind, lambda: self._search([source.term()], args))

    async def similar_to_item(self, item_id: str, args: SearchOptions, transport: str) -> SearchResult:
        return await self.search([TermSpec(item_id=item_id)], args, transport)

    async def similar_to_image(self, data: bytes, args: SearchOptions, transport: str) -> SearchResult:
        return await self.search([TermSpec(image=data)], args, transport)

    def _term(self, spec: TermSpec) -> Term:
        """The term as the search takes it: images read or fetched and decoded, `text_or_item` told apart."""
        name, value = spec.only()
        if name == "text":
            return TextTerm(str(value), spec.weight)
        if name == "item_id":
            return ItemTerm(str(value), spec.weight)
        if name == "text_or_item":
            found = self.core.catalog.get_item(str(value))
            return ItemTerm(str(value), spec.weight) if found is not None else TextTerm(str(value), spec.weight)
        if name == "image_base64":
            data = decode_base64(str(value), self.max_image_bytes)
        elif name == "path":
            data = read_path(str(value), self.policy)
        elif name == "url":
            data = fetch_url(str(value), self.policy)
        else:
            data = bytes(value) if not isinstance(value, str) else value.encode()
        return ImageTerm(self._query_image(data), hashlib.sha256(data).hexdigest(), spec.weight)

    def _query_image(self, data: bytes) -> Image.Image:
        if len(data) > self.max_image_bytes:
            raise ImageRejected(
                f"the image is {len(data):,} bytes, over the limit of {self.max_image_bytes:,} "
                "(CLIPDEX_MAX_IMAGE_BYTES); send a smaller image"
            )
        if not data:
            raise ImageRejected("the image is empty (0 bytes)")
        return self._decode(data, max(self.core.embedder.image_size))

    def _decode(self, data: bytes, side: int) -> Image.Image:
        """Decoded toward `side` (the model's input, a thumbnail) within the process's decode budget."""
        return decode_image(data, max_pixels=self.core.settings.max_pixels, min_side=side, budget=self.decode_budget)

    # -- items ------------------------------------------------------------------------------------------

    async def item(self, item_id: str, transport: str) -> Item:
        """The item, its failure reason as a client may read it."""

        def run() -> Item:
            item = self._item(item_id)
            return item if item.reason is None else replace(item, reason=self.redactor.reason(item.reason))

        return await self._call(transport, "get_item", run)

    def _item(self, item_id: str) -> Item:
        if not item_id.strip():
            raise InvalidRequest("the item id is empty")
        item = self.core.catalog.get_item(item_id)
        if item is None:
            raise NotFound(f"no item with id {item_id!r}; ids come from search results")
        return item

    async def thumbnail(self, item_id: str, transport: str) -> bytes:
        return await self._call(transport, "thumbnail", lambda: self.thumbnail_sync(item_id))

    async def thumbnails(self, item_ids: list[str], transport: str) -> list[bytes | ClipdexError]:
        """Thumbnails of several items (MCP include_images), each a JPEG or the error that prevented it,
        made in the same worker threads, and under the same limit, as every other call."""

        def run() -> list[bytes | ClipdexError]:
            out: list[bytes | ClipdexError] = []
            for item_id in item_ids:
                try:
                    out.append(self.thumbnail_sync(item_id))
                except ClipdexError as exc:
                    out.append(exc)
            return out

        return await self._call(transport, "thumbnails", run)

    def thumbnail_sync(self, item_id: str) -> bytes:
        """A JPEG of at most 256 px of the item's image, read from its uri (within the fetch policy)."""
        item = self._item(item_id)
        key = (item.id, item.sha256)
        with self._thumbs_lock:
            cached = self._thumbs.get(key)
            if cached is not None:
                self._thumbs.move_to_end(key)
                return cached
        data = fetch_bytes(item.uri, self.policy)
        jpeg = thumbnail_jpeg(self._decode(data, THUMBNAIL_SIDE), THUMBNAIL_SIDE)
        with self._thumbs_lock:
            self._thumbs[key] = jpeg
            while len(self._thumbs) > self._thumbs_max:
                self._thumbs.popitem(last=False)
        return jpeg

    async def image(self, item_id: str, transport: str) -> bytes:
        """The item's image file as a JPEG: a JPEG as it is, another format re-encoded (at most 2048 px)."""

        def run() -> bytes:
            data = fetch_bytes(self._item(item_id).uri, self.policy)
            if data.startswith(b"\xff\xd8\xff"):
                return data
            return thumbnail_jpeg(self._decode(data, IMAGE_SIDE), IMAGE_SIDE, quality=90)

        return await self._call(transport, "image", run)

    # -- status -----------------------------------------------------------------------------------------

    async def status(self, transport: str) -> IndexStatusOut:
        return await self._call(transport, "status", lambda: IndexStatusOut.of(self.status_sync()))

    def status_sync(self) -> Status:
        """The store, the indexers' lag (`shared.status`), and this server's own index."""
        core = self.core
        status = read_status(core.settings.data_dir, core.catalog, searcher=core.vectors.state(), recent_dead_letters=5)
        return replace(status, recent_dead_letters=[self._public(d) for d in status.recent_dead_letters])

    def _public(self, letter: DeadLetter) -> DeadLetter:
        """The dead letter with its reason as any caller may read it (tools.redaction)."""
        return replace(letter, reason=self.redactor.reason(letter.reason))

    async def dead_letters(self, limit: int, transport: str) -> list[DeadLetter]:
        """The newest dead letters, newest first, with reasons fit to show to any caller."""

        def run() -> list[DeadLetter]:
            if isinstance(limit, bool) or not 1 <= limit <= MAX_DEAD_LETTERS:
                raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_DEAD_LETTERS} (got {limit})")
            return [self._public(d) for d in self.core.catalog.dead_letters(limit=limit)]

        return await self._call(transport, "dead_letters", run)

    # -- plumbing ---------------------------------------------------------------------------------------

    async def _call(self, transport: str, kind: str, fn: Callable[[], T]) -> T:
        timer = self.metrics.timer(transport, kind)
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._workers)
        try:
            result = await anyio.to_thread.run_sync(fn, limiter=self._limiter)
        except ClipdexError as exc:
            timer.failed(type(exc).__name__)
            raise
        except Exception:
            timer.failed("crash")
            raise
        timer.ok()
        return result


_KINDS = {
    "text": "text",
    "item_id": "item",
    "image": "image",
    "image_base64": "image",
    "path": "image_path",
    "url": "image_url",
}


def _kind(specs: Sequence[TermSpec]) -> str:
    """The metrics label of a search: its one term's kind, or `composite`."""
    if len(specs) != 1:
        return "composite"
    given = [name for name, value in vars(specs[0]).items() if name != "weight" and value is not None]
    return _KINDS.get(given[0], "composite") if len(given) == 1 else "similar"


def decode_base64(value: str, max_bytes: int) -> bytes:
    """Image bytes from base64 (a data: URL prefix is accepted), refusing more than max_bytes."""
    text = value.strip()
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    text = "".join(text.split())
    if len(text) // 4 * 3 > max_bytes + 2:  # refuse before decoding what would be too large anyway
        raise ImageRejected(
            f"the image is about {len(text) // 4 * 3:,} bytes, over the limit of {max_bytes:,} "
            "(CLIPDEX_MAX_IMAGE_BYTES); send a smaller image"
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(
            f"image_base64 is not valid base64 ({exc}); send the image file's bytes encoded with standard base64"
        ) from exc
    if not data:
        raise InvalidRequest("image_base64 is empty")
    return data
