"""The MCP server: search, find_similar, get_item and index_status for AI assistants.

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
from typing import Annotated, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import Field

from shared.errors import ClipdexError, StoreError
from shared.types import SearchResult
from tools.queries import ImageSource, Queries, SearchArgs
from tools.schemas import IndexStatusOut, ItemOut, SearchFilters, SearchOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_IMAGES = 10  # thumbnails per result: enough to look at, small enough for a model's context

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)

INSTRUCTIONS = """\
clipdex searches a collection of images by meaning (CLIP embeddings). Use `search` to find images from a
text description, `find_similar` to find images that look like a given one, `get_item` for one item's
details, and `index_status` to see how big and how fresh the index is. Results are ranked by cosine
similarity; scores are only comparable within one query."""

TopK = Annotated[int, Field(description="How many results to return, 1 to 100.")]
MinScore = Annotated[
    float | None,
    Field(description="Drop results with a cosine similarity below this (-1 to 1). Usually left out."),
]
IncludeImages = Annotated[
    bool,
    Field(description=f"Also return JPEG thumbnails (at most 256 px) of the first {MAX_IMAGES} results."),
]
FiltersArg = Annotated[
    SearchFilters | None,
    Field(description="Only return items whose metadata has these exact values, and/or from this source."),
]


def build_mcp_server(queries: Queries) -> MCPServer:
    """An MCPServer whose tools answer from `queries` (and so from its Core)."""
    server: MCPServer = MCPServer("clipdex", instructions=INSTRUCTIONS, version=package_version())

    async def search(
        query: Annotated[str, Field(description="What to look for, in words, e.g. 'a red bicycle on a beach'.")],
        top_k: TopK = 10,
        filters: FiltersArg = None,
        min_score: MinScore = None,
        include_images: IncludeImages = False,
    ) -> Annotated[CallToolResult, SearchOutput]:
        """Find images that match a text description.

        Use this when the user describes what an image shows ("a dog in the snow", "invoice with a red
        logo"). Describe the picture, not the file: CLIP matches visual content, not file names. Keep it
        short: the model reads about 60 words (and at most 1,000 characters are used); a longer query is
        cut, and the result then has query_truncated=true.

        Returns the best matches first, each with its id (for get_item or find_similar), uri, score and
        metadata, plus how big and how fresh the index is.
        """
        args = _search_args(top_k, filters, min_score)
        result = await _tool_call(queries, queries.search_text(query, args, "mcp"))
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
        include_images: IncludeImages = False,
    ) -> Annotated[CallToolResult, SearchOutput]:
        """Find images that look like a given image.

        Give exactly one source: item_id (an item already in the index, e.g. from a search result; the
        item itself is left out of the results), image_base64 (an image you have), path (a file on the
        server, only under the configured allowed roots) or url (only on the configured allowed hosts).

        Returns the best matches first, each with its id, uri, score and metadata, plus index info.
        """
        args = _search_args(top_k, filters, min_score)
        source = ImageSource(item_id=item_id, image_base64=image_base64, path=path, url=url)
        result = await _tool_call(queries, queries.similar(source, args, "mcp"))
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
    return server


def _search_args(top_k: int, filters: SearchFilters | None, min_score: float | None) -> SearchArgs:
    return SearchArgs(top_k=top_k, filters=filters.to_filters() if filters else None, min_score=min_score)


async def _tool_call(queries: Queries, call: Awaitable[T]) -> T:
    """The call's result, or a ToolError that tells the caller what it may know (tools.redaction); the log
    keeps the detail."""
    try:
        return await call
    except ClipdexError as exc:
        message = queries.redactor.error(exc)
        if message != str(exc):
            logger.log(logging.WARNING if isinstance(exc, StoreError) else logging.INFO, "tool call failed: %s", exc)
        raise ToolError(message) from exc


async def _tool_result(queries: Queries, result: SearchResult, include_images: bool) -> CallToolResult:
    output = SearchOutput.of(result)
    structured = output.model_dump(mode="json")
    content: list[ContentBlock] = [TextContent(type="text", text=json.dumps(structured))]
    if include_images:
        ids = [h.id for h in output.hits[:MAX_IMAGES]]
        content += _thumbnail_blocks(queries, ids, await queries.thumbnails(ids, "mcp"))
    return CallToolResult(content=content, structured_content=structured)


def _thumbnail_blocks(queries: Queries, ids: list[str], thumbnails: list[bytes | ClipdexError]) -> list[ContentBlock]:
    blocks: list[ContentBlock] = []
    for rank, (item_id, jpeg) in enumerate(zip(ids, thumbnails, strict=True), 1):
        if isinstance(jpeg, ClipdexError):
            blocks.append(
                TextContent(
                    type="text", text=f"result {rank} ({item_id}): no thumbnail: {queries.redactor.error(jpeg)}"
                )
            )
            continue
        blocks.append(TextContent(type="text", text=f"result {rank}: {item_id}"))
        blocks.append(ImageContent(type="image", data=base64.b64encode(jpeg).decode(), mime_type="image/jpeg"))
    return blocks


def package_version() -> str:
    try:
        return version("clipdex")
    except PackageNotFoundError:
        return "0"
