"""`clipdex`: the one composition root that sees both sides.

The write side registers its commands from `indexer.commands`, the read side from `tools.commands`;
`run` (watch a folder and serve search in one process) and `demo` compose the two.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import open_clip

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
    models = sub.add_parser("models", help="list the open_clip architectures and pretrained tags")
    models.set_defaults(func=_cmd_models)
    return parser


def _cmd_models(args: argparse.Namespace, settings: Settings) -> int:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(**setting_overrides(args))
        configure_logging(settings.log_level)
        func: Command = args.func
        return func(args, settings)
    except ClipdexError as exc:
        logging.getLogger("clipdex").error("%s", exc)
        print(f"clipdex: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
