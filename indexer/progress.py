"""A progress bar on stderr for `clipdex index`, `clipdex reembed` and `clipdex migrate`: redrawn in place on
a terminal, a line every few seconds otherwise (a log file or a pipe gets progress without a wall of
carriage returns).

    [###########...................] 1200/3300 (36%) 41.5/s, ETA 51s, 2 failed
"""

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
        self._ended: tuple[int, int] | None = None  # (done, total) of the last final line drawn

    def __call__(self, done: int, total: int, summary: FolderSummary) -> None:
        """The folder source's progress callback."""
        self.show(done, total, f"{summary.failed} failed")

    def show(
        self, done: int, total: int, note: str = "", *, rate: float | None = None, eta_s: float | None = None
    ) -> None:
        """`rate` and `eta_s` when the caller knows them better (a resumed job: only this run's items
        count); else from the first call on."""
        now = time.monotonic()
        if self._started is None:
            self._started = now  # the first call comes once the model is loaded and the work is known
        final = done >= total
        if not self.tty and not final and now - self._last < self.every_s:
            return
        if final and self._ended == (done, total):
            return  # the end, drawn already
        self._last = now
        if rate is None:
            rate = done / max(now - self._started, 1e-9)
            eta_s = (total - done) / rate if rate > 0 else None
        fill = self.width if total == 0 else int(self.width * min(done, total) / total)
        bar = "#" * fill + "." * (self.width - fill)
        pct = 100.0 if total == 0 else 100.0 * done / total
        text = f"[{bar}] {done}/{total} ({pct:.0f}%) {rate:.1f}/s, ETA {format_eta(eta_s)}" + (
            f", {note}" if note else ""
        )
        self._ended = (done, total) if final else None
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


def format_eta(seconds: float | None) -> str:
    """`-` (not known yet), `42s`, `3m05s`, `2h07m`."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
