"""Command-line flags that override settings: each flag's help names its CLIPDEX_* variable."""

from __future__ import annotations

import argparse
from typing import Any

from shared.config import Settings, env_name

_PREFIX = "setting__"


def add_setting_flag(parser: argparse.ArgumentParser, flag: str, field: str, **kwargs: Any) -> None:
    """Add `flag`, which overrides the setting `field`; its help ends with [env: CLIPDEX_FIELD]."""
    info = Settings.model_fields[field]
    text = kwargs.pop("help", None) or info.description or ""
    default = info.get_default(call_default_factory=True)
    shown = f", default: {default}" if default not in (None, [], "") and not kwargs.get("action") else ""
    if "action" not in kwargs and "choices" not in kwargs:
        kwargs.setdefault("metavar", field.upper())
    parser.add_argument(
        flag, dest=_PREFIX + field, default=None, help=f"{text} [env: {env_name(field)}{shown}]", **kwargs
    )


def setting_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (flags left out are None and do not override)."""
    return {
        key.removeprefix(_PREFIX): value
        for key, value in vars(args).items()
        if key.startswith(_PREFIX) and value is not None
    }
