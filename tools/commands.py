"""The `clipdex` subcommands of the tools side: serve, mcp, search, similar."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from shared.cliargs import add_setting_flag
from shared.config import Settings
from shared.core import Core, build_core
from shared.errors import InvalidRequest
from shared.fetch import FetchPolicy
from shared.images import decode_image
from shared.query import MAX_DEPTH, Collapse, ImageTerm, ItemTerm, SearchOptions, Term, TextTerm
from shared.signals import stop_on_signals
from shared.types import Filters, SearchResult
from tools.app import first_of, serve_http
from tools.auth import check_bind
from tools.http_api import filter_value
from tools.mcp_server import build_mcp_server
from tools.metrics import Metrics
from tools.queries import UNLIKE_WEIGHT, Queries
from tools.schemas import HitOut


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

    search = sub.add_parser(
        "search",
        help="search the index by text, steered by example images",
        description="Search by text, optionally steered by examples: --like adds a stored item's look (or an "
        "image file's), --unlike pushes away from a text, an item or a file. Each term weighs 1 (an --unlike "
        f"{-UNLIKE_WEIGHT:g}) unless a --weight follows it. Example: "
        'clipdex search "red" --like kafka:sku-1 --unlike "people" --weight 0.8',
    )
    search.add_argument("query", nargs="?", help="what to look for, in words")
    search.add_argument(
        "--like",
        action=_AddTerm,
        metavar="ID_OR_FILE",
        help="also look like this stored item (its id) or image file; repeatable",
    )
    search.add_argument(
        "--unlike",
        action=_AddTerm,
        metavar="TEXT_ID_OR_FILE",
        help="push away from this text, stored item or image file (it lowers, it does not filter); repeatable",
    )
    search.add_argument(
        "--weight",
        action=_SetWeight,
        type=float,
        metavar="W",
        help="the weight of the --like or --unlike before it (of the query when none came before); for "
        "--unlike, how strongly to push away",
    )
    _result_flags(search)
    search.set_defaults(func=cmd_search)

    similar = sub.add_parser("similar", help="find items like a stored item or an image file")
    which = similar.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="item_id", help="id of an indexed item")
    which.add_argument("--image", type=Path, help="an image file")
    _result_flags(similar)
    similar.set_defaults(func=cmd_similar)


def _result_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top-k", type=int, default=10, help="results per page (1 to 100, default 10)")
    parser.add_argument("--min-score", type=float, help="drop results below this cosine similarity")
    parser.add_argument("--max-drop", type=float, help="drop results scoring more than this below the best one")
    parser.add_argument(
        "--collapse",
        choices=[c.value for c in Collapse],
        default="hash",
        help="copies of one image: hash (default: the same file shows once), near (also re-encoded copies), "
        "parent (one hit per product, its best image), none",
    )
    parser.add_argument("--sort-by", metavar="metadata.KEY", help="order the results by this metadata value")
    parser.add_argument("--order", choices=["asc", "desc"], default="desc", help="with --sort-by (default desc)")
    pages = parser.add_mutually_exclusive_group()
    pages.add_argument("--page", type=int, default=1, help="which page of --top-k results (default 1)")
    pages.add_argument("--cursor", help="the page after the one that printed this cursor")
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
    added: list[list[Any]] = getattr(args, "terms", [])
    if args.query is None and not any(kind == "like" for kind, _, _ in added):
        raise InvalidRequest('say what to look for: clipdex search "a red bicycle" (or give --like)')
    core = build_core(settings)
    try:
        terms: list[Term] = []
        if args.query is not None:
            terms.append(TextTerm(args.query, getattr(args, "query_weight", 1.0)))
        for kind, value, weight in added:
            terms.append(_term(core, settings, kind, value, weight))
        result = _page(core, terms, _options(args), args.page)
    finally:
        core.close()
    _print(result, as_json=args.json)
    return 0


def cmd_similar(args: argparse.Namespace, settings: Settings) -> int:
    core = build_core(settings)
    try:
        if args.item_id is not None:
            term: Term = ItemTerm(args.item_id)
        else:
            term = _image_term(core, settings, args.image, 1.0)
        result = _page(core, [term], _options(args), args.page)
    finally:
        core.close()
    _print(result, as_json=args.json)
    return 0


def _page(core: Core, terms: list[Term], options: SearchOptions, page: int) -> SearchResult:
    """Page `page` (from 1), following the cursors of the pages before it."""
    last = math.ceil(MAX_DEPTH / options.top_k) if options.top_k >= 1 else 1
    if not 1 <= page <= last:
        raise InvalidRequest(
            f"--page is from 1 to {last} with --top-k {options.top_k} (results reach {MAX_DEPTH:,} deep)"
        )
    result = core.search.search(terms, options)
    for _ in range(page - 1):
        if result.next_cursor is None:
            return replace(result, hits=[])
        result = core.search.search(terms, replace(options, cursor=result.next_cursor))
    return result


def _term(core: Core, settings: Settings, kind: str, value: str, weight: float | None) -> Term:
    """--like: a stored item or an image file; --unlike: that, or text."""
    w = 1.0 if weight is None else weight
    if kind == "unlike":
        w = -abs(w) if weight is not None else UNLIKE_WEIGHT
    if core.catalog.get_item(value) is not None:
        return ItemTerm(value, w)
    if Path(value).is_file():
        return _image_term(core, settings, Path(value), w)
    if kind == "like":
        raise InvalidRequest(f"--like {value!r}: no stored item has that id, and no such file")
    return TextTerm(value, w)


def _image_term(core: Core, settings: Settings, path: Path, weight: float) -> ImageTerm:
    data = _read_image(path, settings)
    image = decode_image(data, max_pixels=settings.max_pixels, min_side=max(core.embedder.image_size))
    return ImageTerm(image, hashlib.sha256(data).hexdigest(), weight)


def _options(args: argparse.Namespace) -> SearchOptions:
    return SearchOptions(
        top_k=args.top_k,
        filters=_filters(args),
        min_score=args.min_score,
        max_drop=args.max_drop,
        collapse=Collapse(args.collapse),
        sort_by=args.sort_by,
        order=args.order,
        cursor=args.cursor,
    )


class _AddTerm(argparse.Action):
    """--like / --unlike: a term, in the order given (a --weight after it sets its weight)."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any, flag: Any = None) -> None:
        terms = list(getattr(ns, "terms", None) or [])
        terms.append([self.dest, value, None])
        ns.terms = terms


class _SetWeight(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any, flag: Any = None) -> None:
        terms = getattr(ns, "terms", None)
        if terms:
            terms[-1][2] = value
        else:
            ns.query_weight = value


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
    """Tab-separated lines (score, id, uri, then the copies' ids), or with `as_json` a JSON list of
    {id, uri, score, metadata, duplicates}; the next page's cursor, if any, on stderr."""
    hits = [HitOut.of(h).model_dump(mode="json") for h in result.hits]
    if as_json:
        print(json.dumps(hits, ensure_ascii=False))
    else:
        if result.query_truncated:
            print("(the query was longer than the model's context; only its start was used)", file=sys.stderr)
        if not hits:
            print(f"no results ({result.index.items} items indexed)", file=sys.stderr)
        for hit in hits:
            copies = "".join(f"\t{d}" for d in hit["duplicates"])
            print(f"{hit['score']:.4f}\t{hit['id']}\t{hit['uri']}{copies}")
    if result.partial:
        print(
            "(the search stopped looking early: the filter passes few items; better matches may exist)", file=sys.stderr
        )
    if result.next_cursor:
        print(f"more: --cursor {result.next_cursor}", file=sys.stderr)
