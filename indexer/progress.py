"""A progress bar on stderr for `clipdex index` and `clipdex migrate`: redrawn in place on a terminal, a
line every few seconds otherwise (a log file or a pipe gets progress without a wall of carriage returns)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from indexer.sources.folder import FolderSummary


class ProgressBar:
    def __init__(self, stream: TextIO | None = None, *, width: int = 30, every_s: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.every_s = every_s
        self.tty = self.stream.isatty()
        self._started: float | None = None
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int, summary: FolderSummary) -> None:
        self.show(done, total, f"{summary.failed} failed")

    def show(self, done: int, total: int, note: str = "") -> None:
        now = time.monotonic()
        if self._started is None:
            self._started = now  # the first call comes once the model is loaded and the folder scanned
        final = done >= total
        if not self.tty and not final and now - self._last < self.every_s:
            return
        self._last = now
        rate = done / max(now - self._started, 1e-9)
        fill = self.width if total == 0 else int(self.width * done / total)
        bar = "#" * fill + "." * (self.width - fill)
        pct = 100.0 if total == 0 else 100.0 * done / total
        text = f"[{bar}] {done}/{total} ({pct:.0f}%) {rate:.1f}/s" + (f", {note}" if note else "")
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = not final

    def close(self) -> None:
        """End the line if the bar was left mid-way (an interrupted run)."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False
