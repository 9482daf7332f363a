"""The `clipdex` subcommands of the indexer side."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:  # argparse's _SubParsersAction is private
    """Add this side's subcommands to the `clipdex` parser."""
    del sub


__all__ = ["argparse", "register"]
