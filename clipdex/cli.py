"""`clipdex`: the command line, the one place that sees both sides.

The write side registers its commands from `indexer.commands`, the read side from `tools.commands`;
`clipdex.run` (watch a folder and serve search in one process, on one model and one store) and
`clipdex.demo` (the same on generated images with the bundled shapes model) compose the two.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from clipdex import demo, run
from indexer import commands as indexer_commands
from shared.cliargs import add_setting_flag, setting_overrides
from shared.config import Settings, load_settings
from shared.errors import ClipdexError
from tools import commands as tools_commands

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
    run.register(sub)
    demo.register(sub)
    models = sub.add_parser("models", help="list the open_clip architectures and pretrained tags")
    models.set_defaults(func=_cmd_models)
    return parser


def _cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    import open_clip  # seconds to import: only this command needs it up front

    for name, tag in open_clip.list_pretrained():
        print(f"{name}\t{tag}")
    return 0


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
