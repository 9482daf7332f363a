"""The MCP server: search, find_similar, get_item and index_status for AI assistants, and each item as a
resource (clipdex://items/{id}, with /thumbnail and /image).

Served over stdio by `clipdex mcp` (desktop assistants) and over streamable HTTP at /mcp by
`clipdex serve` and `clipdex run`. A desktop client's config:

    {"mcpServers": {"clipdex": {"command": "clipdex", "args": ["mcp"],
                                "env": {"CLIPDEX_DATA_DIR": "/path/to/clipdex-data"}}}}

Every tool is read-only. Failures a caller can fix are `ToolError`s whose text says what to change (in mcp
2.x any other exception reaches the client only as "Error executing tool").
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Awaitable
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Literal, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.server.mcpserver.resources.templates import ResourceSecurity
from mcp_types import CallToolResult, ContentBlock, ImageContent, ResourceLink, TextContent, ToolAnnotations
from pydantic import Field

from shared.errors import ClipdexError, StoreError
from shared.query import MAX_DEPTH, MAX_TOP_K, Collapse, SearchOptions
from shared.types import SearchResult
from tools.queries import UNLIKE_WEIGHT, ImageSource, Queries, TermSpec
from tools.schemas import (
    COLLAPSE,
    ITEM_RESOURCE,
    SORT_BY,
    IndexStatusOut,
    ItemOut,
    McpSearchOutput,
    SearchFilters,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

IMAGE_BUDGET = 1_000_000  # bytes of base64 thumbnails in one result: about 60 of 256 px

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)

INSTRUCTIONS = """\
clipdex searches a collection of images by meaning (CLIP embeddings). Use `search` to find images from a
text description (steered by example images with `like` and `unlike`), `find_similar` to find images that
look like a given one, `get_item` for one item's details, and `index_status` to see how big and how fresh
the index is. Every hit has a `resource` (clipdex://items/{id}): read it for the item's metadata, or
.../thumbnail and .../image to look at the image. Results are ranked by cosine similarity; scores are only
comparable within one query."""

TopK = Annotated[int, Field(description=f"Results per page, 1 to {MAX_TOP_K}.")]
MinScore = Annotated[
    float | None,
    Field(description="Drop results with a cosine similarity below this (-1 to 1). Usually left out."),
]
MaxDrop = Annotated[
    float | None,
    Field(
        description="Drop results scoring more than this below the best result (0 to 2), e.g. 0.1: keeps "
        "the close matches however many there are. Off by default: how far apart good and poor matches "
        "score depends on the model and the query, so look at the first page's scores before choosing."
    ),
]
CollapseArg = Annotated[Literal["hash", "near", "parent", "none"], Field(description=COLLAPSE)]
SortBy = Annotated[str | None, Field(description=SORT_BY)]
Order = Annotated[Literal["asc", "desc"], Field(description="With sort_by: desc (largest or newest first) or asc.")]
CursorArg = Annotated[
    str | None,
    Field(
        description=f"For the next page: the next_cursor of the previous result, with the same other "
        f"arguments (top_k may change). Pages reach {MAX_DEPTH:,} results deep and never repeat a result."
    ),
]
IncludeImages = Annotated[
    bool,
    Field(
        description=f"Also return JPEG thumbnails (at most 256 px) of the results, in order, up to "
        f"{IMAGE_BUDGET // 1_000_000} MB in total (about 60); past that a result has only its resource link."
    ),
]
FiltersArg = Annotated[
    SearchFilters | None,
    Field(description="Only return items whose metadata has these exact values, and/or from this source."),
]
Like = Annotated[
    list[str] | None,
    Field(
        description="Ids of stored items (from earlier results) whose look to add to the query, each "
        "weighing as much as the query text. They are left out of the results."
    ),
]
Unlike = Annotated[
    list[str] | None,
    Field(
        description=f"Texts or item ids to push the results away from (each weighs {-UNLIKE_WEIGHT:g} of the "
        "query; a stored item's id is that item's look, anything else is read as text). It lowers what looks "
        "like them; it does not remove them: CLIP has no negation. To exclude, filter on metadata."
    ),
]


def build_mcp_server(queries: Queries) -> MCPServer:
    """An MCPServer whose tools and resources answer from `queries` (and so from its Core)."""
    server: MCPServer = MCPServer("clipdex", instructions=INSTRUCTIONS, version=package_version())

    async def search(
        query: Annotated[str, Field(description="What to look for, in words, e.g. 'a red bicycle on a beach'.")],
        like: Like = None,
        unlike: Unlike = None,
        top_k: TopK = 10,
        filters: FiltersArg = None,
        min_score: MinScore = None,
        max_drop: MaxDrop = None,
        collapse: CollapseArg = "hash",
        sort_by: SortBy = None,
        order: Order = "desc",
        cursor: CursorArg = None,
        include_images: IncludeImages = False,
    ) -> Annotated[CallToolResult, McpSearchOutput]:
        """Find images that match a text description, optionally steered by example images.

        Use this when the user describes what an image shows ("a dog in the snow", "invoice with a red
        logo"). Describe the picture, not the file: CLIP matches visual content, not file names. Keep it
        short: the model reads about 60 words (and at most 1,000 characters are used); a longer query is
        cut, and the result then has query_truncated=true.

        Refine with examples: "like this one but red" is search(query="red", like=["<id of this one>"]);
        "beaches, fewer people" is search(query="a beach", unlike=["people"]). unlike only ranks what
        looks like it lower; it never guarantees its absence.

        Copies of one image show once, the others' ids in `duplicates` (collapse="near" also folds
        re-encoded or resized copies; "parent" shows one hit per product, its best image, listing its
        other images; "none" shows all). sort_by="metadata.date" with order="desc" lists
        the relevant results newest first: set max_drop or min_score so that only good matches are sorted.
        For more results, call again with cursor=<next_cursor>.

        Returns the results, each with its id (for get_item, find_similar or like), uri, score, metadata,
        duplicates and resource (clipdex://items/{id}, read it or its /thumbnail or /image), plus how big
        and how fresh the index is.
        """
        specs = [TermSpec(text=query)]
        specs += [TermSpec(item_id=i) for i in like or ()]
        specs += [TermSpec(text_or_item=u, weight=UNLIKE_WEIGHT) for u in unlike or ()]
        options = _options(top_k, filters, min_score, max_drop, collapse, sort_by, order, cursor)
        result = await _tool_call(queries, queries.search(specs, options, "mcp"))
        return await _tool_result(queries, result, include_images)

    async def find_similar(
        item_id: Annotated[str | None, Field(description="Id of an indexed item (from a search result).")] = None,
        image_base64: Annotated[
            str | None, Field(description="An image file's bytes in standard base64 (a data: URL also works).")
        ] = None,
        path: Annotated[
            str | None, Field(description="Path of an image file on the server, under an allowed root.")
        ] = None,
        url: Annotated[str | None, Field(description="http(s) URL of an image, on an allowlisted host.")] = None,
        top_k: TopK = 10,
        filters: FiltersArg = None,
        min_score: MinScore = None,
        max_drop: MaxDrop = None,
        collapse: CollapseArg = "hash",
        sort_by: SortBy = None,
        order: Order = "desc",
        cursor: CursorArg = None,
        include_images: IncludeImages = False,
    ) -> Annotated[CallToolResult, McpSearchOutput]:
        """Find images that look like a given image.

        Give exactly one source: item_id (an item already in the index, e.g. from a search result; the
        item itself is left out of the results), image_base64 (an image you have), path (a file on the
        server, only under the configured allowed roots) or url (only on the configured allowed hosts).
        To mix an image with words ("like this but red"), use search with like=[item_id].

        Returns the best matches first, each with its id, uri, score, metadata, duplicates and resource,
        plus index info; next_cursor gives the next page.
        """
        options = _options(top_k, filters, min_score, max_drop, collapse, sort_by, order, cursor)
        source = ImageSource(item_id=item_id, image_base64=image_base64, path=path, url=url)
        result = await _tool_call(queries, queries.similar(source, options, "mcp"))
        return await _tool_result(queries, result, include_images)

    async def get_item(
        item_id: Annotated[str, Field(description="The item id, as in a search result.")],
    ) -> ItemOut:
        """Show one item: its uri, metadata, content hash, and whether it is indexed or why it failed."""
        return ItemOut.of(await _tool_call(queries, queries.item(item_id, "mcp")))

    async def index_status() -> IndexStatusOut:
        """Report on the index: item, failure and dead-letter counts (with the latest reasons), the model,
        the main index generation and delta size, the last compaction, and how far this server lags behind
        the store. Use it to explain empty or stale results."""
        return await _tool_call(queries, queries.status("mcp"))

    for tool in (search, find_similar, get_item, index_status):
        server.add_tool(tool, annotations=READ_ONLY)
    _add_item_resources(server, queries)
    return server


def _add_item_resources(server: MCPServer, queries: Queries) -> None:
    """clipdex://items/{id} (the item as JSON), .../thumbnail (JPEG, at most 256 px) and .../image (the
    image file; re-encoded as JPEG when it is another format). Ids are percent-encoded in the URI."""
    ids_are_data = ResourceSecurity(exempt_params={"item_id"})  # looked up in the catalog, never a path

    @server.resource(f"{ITEM_RESOURCE}{{item_id}}", name="item", mime_type="application/json", security=ids_are_data)
    async def item(item_id: str) -> str:
        """One item: uri, metadata, content hash, status."""
        found = await _resource_call(queries, queries.item(item_id, "mcp"))
        return ItemOut.of(found).model_dump_json()

    @server.resource(
        f"{ITEM_RESOURCE}{{item_id}}/thumbnail", name="thumbnail", mime_type="image/jpeg", security=ids_are_data
    )
    async def thumbnail(item_id: str) -> bytes:
        """A JPEG of the item's image, at most 256 px."""
        return await _resource_call(queries, queries.thumbnail(item_id, "mcp"))

    @server.resource(f"{ITEM_RESOURCE}{{item_id}}/image", name="image", mime_type="image/jpeg", security=ids_are_data)
    async def image(item_id: str) -> bytes:
        """The item's image as stored (a JPEG as it is; another format re-encoded as JPEG)."""
        return await _resource_call(queries, queries.image(item_id, "mcp"))


def _options(
    top_k: int,
    filters: SearchFilters | None,
    min_score: float | None,
    max_drop: float | None,
    collapse: str,
    sort_by: str | None,
    order: str,
    cursor: str | None,
) -> SearchOptions:
    return SearchOptions(
        top_k=top_k,
        filters=filters.to_filters() if filters else None,
        min_score=min_score,
        max_drop=max_drop,
        collapse=Collapse(collapse),
        sort_by=sort_by,
        order="asc" if order == "asc" else "desc",
        cursor=cursor,
    )


async def _tool_call(queries: Queries, call: Awaitable[T]) -> T:
    """The call's result, or a ToolError that tells the caller what it may know (tools.redaction); the log
    keeps the detail."""
    try:
        return await call
    except ClipdexError as exc:
        raise ToolError(_public(queries, exc)) from exc


async def _resource_call(queries: Queries, call: Awaitable[T]) -> T:
    try:
        return await call
    except ClipdexError as exc:
        raise ResourceError(_public(queries, exc)) from exc


def _public(queries: Queries, exc: ClipdexError) -> str:
    message = queries.redactor.error(exc)
    if message != str(exc):
        logger.log(logging.WARNING if isinstance(exc, StoreError) else logging.INFO, "MCP call failed: %s", exc)
    return message


async def _tool_result(queries: Queries, result: SearchResult, include_images: bool) -> CallToolResult:
    output = McpSearchOutput.of_result(result)
    structured = output.model_dump(mode="json")
    content: list[ContentBlock] = [TextContent(type="text", text=json.dumps(structured))]
    content += [
        ResourceLink(type="resource_link", uri=h.resource, name=h.id, mime_type="application/json") for h in output.hits
    ]
    if include_images and output.hits:
        content += await _thumbnails(queries, [h.id for h in output.hits])
    return CallToolResult(content=content, structured_content=structured)


async def _thumbnails(queries: Queries, ids: list[str]) -> list[ContentBlock]:
    """Thumbnails of the hits in order, until IMAGE_BUDGET bytes of base64 are spent."""
    blocks: list[ContentBlock] = []
    spent = 0
    for start in range(0, len(ids), 10):  # made ten at a time: none past the budget
        batch = ids[start : start + 10]
        for rank, (item_id, jpeg) in enumerate(
            zip(batch, await queries.thumbnails(batch, "mcp"), strict=True), start + 1
        ):
            if isinstance(jpeg, ClipdexError):
                text = f"result {rank} ({item_id}): no thumbnail: {queries.redactor.error(jpeg)}"
                blocks.append(TextContent(type="text", text=text))
                continue
            data = base64.b64encode(jpeg).decode()
            if spent + len(data) > IMAGE_BUDGET:
                left = len(ids) - rank + 1
                blocks.append(
                    TextContent(
                        type="text",
                        text=f"thumbnails stop at result {rank - 1}: the {IMAGE_BUDGET // 1_000_000} MB budget "
                        f"is spent; {left} more can be read from their resource links (.../thumbnail)",
                    )
                )
                return blocks
            spent += len(data)
            blocks.append(TextContent(type="text", text=f"result {rank}: {item_id}"))
            blocks.append(ImageContent(type="image", data=data, mime_type="image/jpeg"))
    return blocks


def package_version() -> str:
    try:
        return version("clipdex")
    except PackageNotFoundError:
        return "0"
