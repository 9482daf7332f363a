"""The `clipdex` subcommands of the tools side: serve, mcp, search, similar."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from shared.cliargs import add_setting_flag
from shared.config import Settings
from shared.core import Core, build_core
from shared.errors import InvalidRequest
from shared.fetch import FetchPolicy
from shared.images import decode_image
from shared.signals import stop_on_signals
from shared.types import Filters, SearchResult
from tools.app import first_of, serve_http
from tools.auth import check_bind
from tools.http_api import filter_value
from tools.mcp_server import build_mcp_server
from tools.metrics import Metrics
from tools.queries import Queries


def register(sub: Any) -> None:  # argparse's _SubParsersAction is private
    """Add this side's subcommands to the `clipdex` parser."""
    serve = sub.add_parser(
        "serve",
        help="serve search over HTTP and MCP (/mcp) on one port",
        description="Serve the HTTP API and MCP (streamable HTTP at /mcp) from the store in CLIPDEX_DATA_DIR, "
        "following it as an indexer writes to it.",
    )
    add_setting_flag(serve, "--host", "host")
    add_setting_flag(serve, "--port", "port", type=int)
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without CLIPDEX_API_TOKEN (only on a trusted network)",
    )
    serve.set_defaults(func=cmd_serve)

    mcp = sub.add_parser(
        "mcp",
        help="serve MCP over stdio (for desktop assistants)",
        description="Serve the MCP tools over stdin/stdout. Client config: "
        '{"command": "clipdex", "args": ["mcp"], "env": {"CLIPDEX_DATA_DIR": "..."}}',
    )
    mcp.set_defaults(func=cmd_mcp)

    search = sub.add_parser("search", help="search the index by text")
    search.add_argument("query", help="what to look for, in words")
    _result_flags(search)
    search.set_defaults(func=cmd_search)

    similar = sub.add_parser("similar", help="find items like a stored item or an image file")
    which = similar.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="item_id", help="id of an indexed item")
    which.add_argument("--image", type=Path, help="an image file")
    _result_flags(similar)
    similar.set_defaults(func=cmd_similar)


def _result_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top-k", type=int, default=10, help="how many results (1 to 100, default 10)")
    parser.add_argument("--min-score", type=float, help="drop results below this cosine similarity")
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only items whose metadata KEY equals VALUE (repeatable)",
    )
    parser.add_argument("--source", help="only items from this source (folder, kafka)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {id, uri, score, metadata}")


# -- servers ----------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    check_bind(settings, insecure=args.insecure)  # before the model loads, so a refusal is immediate
    core = build_core(settings)
    try:
        core.start_refresh()
        asyncio.run(_serve_until_signal(core, settings, insecure=args.insecure))
    finally:
        core.close()
    return 0


async def _serve_until_signal(core: Core, settings: Settings, *, insecure: bool) -> None:
    stop = asyncio.Event()
    stop_on_signals(stop)
    await serve_http(core, settings, stop, insecure=insecure)


def cmd_mcp(args: argparse.Namespace, settings: Settings) -> int:
    core = build_core(settings)
    try:
        core.start_refresh()
        asyncio.run(_mcp_until_signal(core, settings))
    finally:
        core.close()
    return 0


async def _mcp_until_signal(core: Core, settings: Settings) -> None:
    """Serve MCP on stdio until the client closes stdin or a signal comes (a call in flight is cancelled:
    every tool is a read)."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    server = build_mcp_server(Queries(core, FetchPolicy.from_settings(settings), Metrics()))
    task = asyncio.create_task(server.run_stdio_async())
    try:
        await first_of(task, stop.wait())
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- one-shot searches ------------------------------------------------------------------------------------


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    core = build_core(settings)
    try:
        result = core.search.search_text(args.query, args.top_k, _filters(args), args.min_score)
    finally:
        core.close()
    _print(result, as_json=args.json)
    return 0


def cmd_similar(args: argparse.Namespace, settings: Settings) -> int:
    core = build_core(settings)
    try:
        if args.item_id is not None:
            result = core.search.similar_to_item(args.item_id, args.top_k, _filters(args), args.min_score)
        else:
            data = _read_image(args.image, settings)
            image = decode_image(data, max_pixels=settings.max_pixels, min_side=max(core.embedder.image_size))
            result = core.search.search_image(image, args.top_k, _filters(args), args.min_score)
    finally:
        core.close()
    _print(result, as_json=args.json)
    return 0


def _read_image(path: Path, settings: Settings) -> bytes:
    try:
        if path.stat().st_size > settings.max_image_bytes:
            raise InvalidRequest(f"{path} is over CLIPDEX_MAX_IMAGE_BYTES ({settings.max_image_bytes:,} bytes)")
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from exc


def _filters(args: argparse.Namespace) -> Filters | None:
    metadata = {}
    for pair in args.filter:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"--filter takes KEY=VALUE (got {pair!r})")
        metadata[key] = filter_value(value)
    return Filters(metadata=metadata, source=args.source) if metadata or args.source else None


def _print(result: SearchResult, *, as_json: bool) -> None:
    hits = [{"id": h.id, "uri": h.uri, "score": round(h.score, 6), "metadata": h.metadata} for h in result.hits]
    if as_json:
        print(json.dumps(hits, ensure_ascii=False))
        return
    if result.query_truncated:
        print("(the query was longer than the model's context; only its start was used)", file=sys.stderr)
    if not hits:
        print(f"no results ({result.index.items} items indexed)", file=sys.stderr)
    for hit in hits:
        print(f"{hit['score']:.4f}\t{hit['id']}\t{hit['uri']}")
