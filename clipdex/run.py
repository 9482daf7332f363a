"""`clipdex run DIR`: the main job. A folder indexer and the search server (HTTP + MCP) in one process,
on one model (loaded once) and one store (opened once as a reader, once as a writer).

    build_core ─▶ model + reader ─┬─▶ serve_http (tools)          until a signal, or until either fails;
                                  └─▶ watch_folder (indexer)      then the other is stopped too
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from indexer.service import folder_lock, watch_folder
from shared.cliargs import add_setting_flag
from shared.config import Settings
from shared.core import Core, build_core
from shared.errors import ConfigError
from shared.signals import stop_on_signals
from tools.app import serve_http
from tools.auth import check_bind


def register(sub: Any) -> None:  # argparse's _SubParsersAction is private
    run = sub.add_parser(
        "run",
        help="index a folder, keep watching it, and serve search (MCP + HTTP) in one process",
        description="The main job: index DIR, then watch it (new, changed, renamed and deleted files), and "
        "serve the HTTP API and MCP (at /mcp) from the same process. Ctrl-C finishes the batch in flight.",
    )
    run.add_argument("dir", type=Path, metavar="DIR")
    server_flags(run)
    run.set_defaults(func=cmd_run)


def server_flags(parser: argparse.ArgumentParser) -> None:
    add_setting_flag(parser, "--host", "host")
    add_setting_flag(parser, "--port", "port", type=int)
    add_setting_flag(parser, "--poll", "watch_polling", action="store_true")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without CLIPDEX_API_TOKEN")


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    root: Path = args.dir
    if not root.is_dir():
        raise ConfigError(f"{root}: not a directory (clipdex run DIR indexes and watches a folder of images)")
    check_bind(settings, insecure=args.insecure)  # refuse before the model loads
    with folder_lock(settings, root):  # and a second writer of this folder too, naming the first
        core = build_core(settings)
        try:
            core.start_refresh()
            asyncio.run(_run_indexer_and_server(core, settings, root, insecure=args.insecure))
        finally:
            core.close()
    return 0


async def _run_indexer_and_server(core: Core, settings: Settings, root: Path, *, insecure: bool) -> None:
    """Both halves until a signal, or until either fails; then the other is stopped too."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    indexer = asyncio.create_task(watch_folder(settings, root, stop, embedder=core.embedder), name="indexer")
    server = asyncio.create_task(serve_http(core, settings, stop, insecure=insecure, extra_roots=[root]), name="server")
    try:
        await asyncio.wait({indexer, server}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        results = await asyncio.gather(indexer, server, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
