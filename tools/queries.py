"""The read side's operations, shared by the MCP tools and the HTTP API.

Arguments are checked here (so both front doors refuse the same things with the same words), blocking
work (model calls, FAISS, SQLite, file and URL reads, JPEG encoding) runs in worker threads so the event
loop keeps serving, and every call is counted and timed. Failures are shared.errors exceptions; each front
door turns them into its own kind of error.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import anyio
import anyio.to_thread
from PIL import Image

from shared.core import Core
from shared.errors import ClipdexError, ImageRejected, InvalidRequest, NotFound
from shared.fetch import FetchPolicy, fetch_bytes, fetch_url, read_path
from shared.images import decode_budget, decode_image, thumbnail_jpeg
from shared.roles import DeadLetter
from shared.search import MAX_TOP_K
from shared.status import Status, read_status
from shared.types import Filters, Item, SearchResult
from tools.metrics import Metrics
from tools.redaction import Redactor
from tools.schemas import IndexStatusOut

logger = logging.getLogger(__name__)

T = TypeVar("T")

THUMBNAIL_SIDE = 256
MAX_DEAD_LETTERS = 500


@dataclass(frozen=True)
class SearchArgs:
    top_k: int = 10
    filters: Filters | None = None
    min_score: float | None = None

    def check(self) -> None:
        if isinstance(self.top_k, bool) or not 1 <= self.top_k <= MAX_TOP_K:
            raise InvalidRequest(f"top_k must be a whole number from 1 to {MAX_TOP_K} (got {self.top_k})")
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise InvalidRequest(
                f"min_score is a cosine similarity and must be between -1 and 1 (got {self.min_score}); "
                "leave it out to get the top_k best matches whatever their score"
            )


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

    async def search_text(self, query: str, args: SearchArgs, transport: str) -> SearchResult:
        def run() -> SearchResult:
            if not query or not query.strip():
                raise InvalidRequest("the query is empty: describe the images you are looking for")
            args.check()
            return self.core.search.search_text(query, args.top_k, args.filters, args.min_score)

        return await self._call(transport, "text", run)

    async def similar(self, source: ImageSource, args: SearchArgs, transport: str) -> SearchResult:
        """Items like the one image that `source` names."""
        given = [name for name, value in vars(source).items() if value is not None]
        kind = {"item_id": "item", "image_base64": "image", "path": "image_path", "url": "image_url"}.get(
            given[0] if len(given) == 1 else "", "similar"
        )

        def run() -> SearchResult:
            name, value = source.only()
            args.check()
            if name == "item_id":
                return self.core.search.similar_to_item(value, args.top_k, args.filters, args.min_score)
            if name == "image_base64":
                data = decode_base64(value, self.max_image_bytes)
            elif name == "path":
                data = read_path(value, self.policy)
            else:
                data = fetch_url(value, self.policy)
            return self._search_image(data, args)

        return await self._call(transport, kind, run)

    async def similar_to_item(self, item_id: str, args: SearchArgs, transport: str) -> SearchResult:
        def run() -> SearchResult:
            if not item_id.strip():
                raise InvalidRequest("the item id is empty")
            args.check()
            return self.core.search.similar_to_item(item_id, args.top_k, args.filters, args.min_score)

        return await self._call(transport, "item", run)

    async def similar_to_image(self, data: bytes, args: SearchArgs, transport: str) -> SearchResult:
        return await self._call(transport, "image", lambda: self._search_image(data, args))

    def _search_image(self, data: bytes, args: SearchArgs) -> SearchResult:
        args.check()
        if len(data) > self.max_image_bytes:
            raise ImageRejected(
                f"the image is {len(data):,} bytes, over the limit of {self.max_image_bytes:,} "
                "(CLIPDEX_MAX_IMAGE_BYTES); send a smaller image"
            )
        if not data:
            raise ImageRejected("the image is empty (0 bytes)")
        image = self._decode(data, max(self.core.embedder.image_size))
        return self.core.search.search_image(image, args.top_k, args.filters, args.min_score)

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
