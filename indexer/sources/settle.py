"""When a changed file may be read: once its size and mtime have held still (the settler).

A file being copied grows in chunks; reading it too early indexes half an image. The settler holds every
path the watcher reports until a second look finds the same size and mtime as the first, `settle_s`
after the last change. An image whose ending is already whole (a JPEG's end-of-image marker, a PNG's
IEND chunk, ...) is released sooner, after `quick_s`: most writers are done by then, and a writer that
pauses longer than that mid-file has not written the ending yet.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path | str) -> FileStat | None:
        """The file's size and mtime (following a symlink), or None when there is no regular file."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not os.path.isfile(path):
            return None
        return cls(st.st_size, st.st_mtime_ns)


@dataclass
class _Pending:
    stat: FileStat | None
    changed_at: float  # monotonic: the last time the file was seen changing
    seen_at: float  # wall clock: when the file was last seen changing (the lag counts from there)


@dataclass(frozen=True)
class Settled:
    rel: str
    stat: FileStat | None  # None: the file is gone
    seen_at: float


class Settler:
    """Paths seen changing, released once they hold still. Thread-safe; `due` does the file system calls."""

    def __init__(
        self,
        root: Path,
        settle_s: float,
        *,
        quick_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.settle_s = settle_s
        self.quick_s = min(settle_s, 0.1) if quick_s is None else min(quick_s, settle_s)
        self._clock = clock
        self._wall = wall
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def observe(self, rel: str, stat: FileStat | None = None, *, seen_at: float | None = None) -> None:
        """The watcher says `rel` changed (or a scan found it still fresh): start or restart its clock."""
        stat = stat if stat is not None else FileStat.of(self.root / rel)
        now = self._clock()
        with self._lock:
            pending = self._pending.get(rel)
            if pending is None:
                self._pending[rel] = _Pending(stat, now, seen_at if seen_at is not None else self._wall())
            else:
                pending.stat, pending.changed_at = stat, now
                pending.seen_at = seen_at if seen_at is not None else self._wall()

    def due(self) -> list[Settled]:
        """The paths that held still long enough, each released once."""
        now = self._clock()
        with self._lock:
            candidates = [
                (rel, p.stat, p.changed_at) for rel, p in self._pending.items() if now - p.changed_at >= self.quick_s
            ]
        out = []
        for rel, stat, changed_at in candidates:
            path = self.root / rel
            fresh = FileStat.of(path)
            if fresh == stat:
                long_enough = now - changed_at >= self.settle_s
                if not long_enough and (stat is None or not looks_complete(path, stat.size)):
                    continue
            with self._lock:
                pending = self._pending.get(rel)
                if pending is None or pending.changed_at != changed_at:
                    continue  # seen changing again meanwhile
                if fresh == stat:
                    del self._pending[rel]
                    out.append(Settled(rel, stat, pending.seen_at))
                else:
                    pending.stat, pending.changed_at = fresh, self._clock()
        return out


def looks_complete(path: Path, size: int) -> bool:
    """Does the file end the way a whole image of its format ends? False when unsure."""
    if size < 16:
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            fh.seek(size - 12)
            tail = fh.read(12)
    except OSError:
        return False
    if head.startswith(b"\xff\xd8"):  # JPEG: ends with the EOI marker (a stuffed FF never precedes D9)
        return tail.endswith(b"\xff\xd9")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):  # PNG: ends with the IEND chunk
        return tail == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    if head.startswith((b"GIF87a", b"GIF89a")):  # GIF: ends with the trailer byte
        return tail.endswith(b";")
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":  # WebP: the RIFF header gives the size
        return int.from_bytes(head[4:8], "little") + 8 == size
    if head.startswith(b"BM"):  # BMP: the header gives the size
        return int.from_bytes(head[2:6], "little") == size
    return False
