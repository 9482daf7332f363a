"""`clipdex`: the one composition root that sees both sides.

The write side registers its commands from `indexer.commands`, the read side from `tools.commands`;
`run` (watch a folder and serve search in one process, on one model and one store) and `demo` (the same
on generated images with the bundled shapes model) compose the two.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from indexer import commands as indexer_commands
from indexer.service import run_folder_indexer, stop_on_signals
from shared import synthetic
from shared.cliargs import add_setting_flag, setting_overrides
from shared.config import Settings, load_settings
from shared.core import Core, build_core
from shared.errors import ClipdexError, ConfigError
from tools import commands as tools_commands
from tools.app import serve_http
from tools.auth import check_bind

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
DEMO_MODEL = "clipdex-shapes"

logger = logging.getLogger("clipdex")

Command = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipdex",
        description="Self-hosted visual search: index images with CLIP, search them by text or by image.",
    )
    add_setting_flag(parser, "--data-dir", "data_dir")
    add_setting_flag(parser, "--log-level", "log_level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    indexer_commands.register(sub)
    tools_commands.register(sub)
    _register_run(sub)
    models = sub.add_parser("models", help="list the open_clip architectures and pretrained tags")
    models.set_defaults(func=_cmd_models)
    return parser


def _cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    import open_clip  # seconds to import: only this command needs it up front

    for name, tag in open_clip.list_pretrained():
        print(f"{name}\t{tag}")
    return 0


def _register_run(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="index a folder, keep watching it, and serve search (MCP + HTTP) in one process",
        description="The main job: index DIR, then watch it (new, changed, renamed and deleted files), and "
        "serve the HTTP API and MCP (at /mcp) from the same process. Ctrl-C finishes the batch in flight.",
    )
    run.add_argument("dir", type=Path, metavar="DIR")
    _server_flags(run)
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser(
        "demo",
        help="offline demo: generate shape images and run the main job on them with the bundled shapes model",
        description="Writes generated images (coloured circles, squares, triangles and crosses) to DIR/images "
        "and runs `clipdex run` on them with the small shapes model bundled in tests/fixtures/models. That "
        "model knows only shapes and colours; the default model for real photos is ViT-B-32 (laion2b).",
    )
    demo.add_argument("dir", type=Path, nargs="?", default=Path("clipdex-demo"), metavar="DIR")
    demo.add_argument(
        "--count", type=int, default=192, help="images to generate, spread evenly over 32 classes (default: 192)"
    )
    _server_flags(demo)
    demo.set_defaults(func=_cmd_demo)


def _server_flags(parser: argparse.ArgumentParser) -> None:
    add_setting_flag(parser, "--host", "host")
    add_setting_flag(parser, "--port", "port", type=int)
    add_setting_flag(parser, "--poll", "watch_polling", action="store_true")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without CLIPDEX_API_TOKEN")


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    root: Path = args.dir
    if not root.is_dir():
        raise ConfigError(f"{root}: not a directory (clipdex run DIR indexes and watches a folder of images)")
    check_bind(settings, insecure=args.insecure)  # refuse before the model loads
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
    indexer = asyncio.create_task(run_folder_indexer(core, root, stop), name="indexer")
    server = asyncio.create_task(serve_http(core, settings, stop, insecure=insecure, extra_roots=[root]), name="server")
    try:
        await asyncio.wait({indexer, server}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        results = await asyncio.gather(indexer, server, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    checkpoint = DEMO_MODEL_DIR / f"{DEMO_MODEL}.safetensors"
    if not checkpoint.is_file():
        raise ConfigError(f"the demo model is missing ({checkpoint}); `clipdex demo` runs from a clone of the repo")
    images = args.dir / "images"
    if not images.is_dir() or not any(images.iterdir()):
        written = _write_demo_images(images, args.count)
        logger.info("wrote %d demo images to %s", written, images)
    demo_settings = settings.model_copy(
        update={
            "data_dir": args.dir / "data",
            "model": DEMO_MODEL,
            "pretrained": str(checkpoint),
            "model_configs": DEMO_MODEL_DIR,
        }
    )
    url = f"http://{settings.host}:{settings.port}"
    print(
        f"clipdex demo: generated images in {images}, searched with the bundled shapes model.\n"
        "  This model knows ONLY shapes (circle, square, triangle, cross) and colours; for real photos use\n"
        "  the default model, ViT-B-32 (laion2b_s34b_b79k).\n"
        f"  Try:  curl '{url}/search?query=a+red+circle&top_k=5'\n"
        f"        clipdex --data-dir {args.dir / 'data'} status\n"
        f"  MCP:  {url}/mcp   API docs: {url}/docs   Ctrl-C to stop.",
        file=sys.stderr,
    )
    args.dir = images
    return _cmd_run(args, demo_settings)


def _write_demo_images(folder: Path, count: int) -> int:
    """About `count` images, the same number of each colour and shape, so every query has answers."""
    classes = [(colour, shape) for colour in synthetic.COLOURS for shape in synthetic.SHAPES]
    per_class = max(1, count // len(classes))
    for i, (colour, shape) in enumerate(classes):
        synthetic.write_folder(
            folder, per_class, seed=2026 + i, size=(320, 240), colours=[colour], shapes=[shape], start=i * per_class
        )
    return per_class * len(classes)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_open_clip)


def _quiet_open_clip(record: logging.LogRecord) -> bool:
    """open_clip logs each loading step at INFO on the root logger; our own line says what matters."""
    return record.levelno >= logging.WARNING or "/open_clip/" not in record.pathname.replace("\\", "/")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(**setting_overrides(args))
        configure_logging(settings.log_level)
        func: Command = args.func
        return func(args, settings)
    except ClipdexError as exc:
        print(f"clipdex: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
