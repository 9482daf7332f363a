"""Writer locks: lock files that name their holder.

    <data dir>/writer-folder-<digest of the folder's path>.lock, <data dir>/writer-kafka.lock
        {"pid": 4242, "command": "clipdex watch /srv/images", "since": 1767..., "host": "box",
         "what": "the folder /srv/images", "retries": ["folder:images/"]}

`hold(path)` takes an exclusive `flock` on the file, then writes who holds it. The kernel releases the
lock when the holder's process ends, however it ends: a holder killed with SIGKILL leaves its file
behind, but blocks nobody (the next writer takes the lock and writes itself in). A second process that
asks fails at once with `WriterBusy`, whose message names the holder. (`shared.stores` decides what a
lock covers: one per source of items.)

Within one process a lock is counted, not taken twice (`clipdex run` holds its folder's for its whole
life and its indexer asks again). `holders(dir)` tells another process who writes now, without taking
any lock (`clipdex status`; `clipdex dlq retry` hands dead letters to the running indexer of their items
instead of writing beside it).

`flock` works on local file systems; on NFS, Linux emulates it with POSIX byte-range locks, which need a
working lock daemon. Keep a data directory on a local disk.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from shared.errors import WriterBusy

logger = logging.getLogger(__name__)

PREFIX = "writer-"


@dataclass(frozen=True)
class Holder:
    """Who holds a writer lock, and over what."""

    pid: int
    command: str
    since: float
    host: str = ""
    what: str = ""  # what the lock covers, for people: "the folder /srv/images", "Kafka items"
    retries: tuple[str, ...] = ()  # item id prefixes whose due dead letters it retries on its own

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.since, UTC).isoformat(timespec="seconds")
        where = f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        return f"pid {self.pid}{where} (`{self.command}`), since {when}"

    def takes(self, item_id: str | None) -> bool:
        """Does this holder retry the dead letters of `item_id` by itself?"""
        return item_id is not None and item_id.startswith(self.retries) if self.retries else False

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(
                pid=int(data["pid"]),
                command=str(data.get("command") or "?"),
                since=float(data.get("since") or 0.0),
                host=str(data.get("host") or ""),
                what=str(data.get("what") or ""),
                retries=tuple(str(p) for p in data.get("retries") or ()),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


@dataclass
class _Held:
    file: IO[str]
    holder: Holder
    count: int = 0
    extra_retries: list[str] = field(default_factory=list)


_held: dict[str, _Held] = {}  # real path of the lock file -> this process's hold on it
_guard = threading.Lock()


def command_line(argv: Sequence[str] | None = None) -> str:
    """How people started this process: `clipdex watch /srv/images`, also under `python -m clipdex`."""
    args = list(sys.argv if argv is None else argv)
    program = os.path.basename(args[0]) if args else "?"
    if program in ("__main__.py", "cli.py") or program.startswith("clipdex"):
        program = "clipdex"
    return shlex.join([program, *args[1:]])


@contextmanager
def hold(path: Path, *, what: str = "", command: str | None = None) -> Iterator[Holder]:
    """Hold the lock file at `path` (`what` it covers, for messages) for the block; WriterBusy at once,
    naming the holder, when another process holds it."""
    key = _acquire(path, what, command)
    try:
        yield _held[key].holder
    finally:
        _release(key)


def announce_retries(path: Path, prefixes: Sequence[str]) -> None:
    """Tell other processes which item ids' dead letters this holder retries (it must hold the lock)."""
    with _guard:
        held = _held.get(_key(path))
        if held is None:
            return
        held.extra_retries.extend(p for p in prefixes if p not in held.extra_retries)
        held.holder = Holder(**{**held.holder.__dict__, "retries": tuple(held.extra_retries)})
        _write(held.file, held.holder)


def holders(directory: Path) -> list[Holder]:
    """Every process that holds one of the writer locks in `directory` now (this one included)."""
    found = [holder(path) for path in sorted(directory.glob(f"{PREFIX}*.lock"))]
    return [h for h in found if h is not None]


def holder(path: Path) -> Holder | None:
    """The process that holds the lock now, or None when none does (a stale file is no holder)."""
    key = _key(path)
    with _guard:
        if key in _held:
            return _held[key].holder
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd) as file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(file) or Holder(pid=0, command="?", since=time.time())
        fcntl.flock(file, fcntl.LOCK_UN)
        return None


def _acquire(path: Path, what: str, command: str | None) -> str:
    key = _key(path)
    with _guard:
        held = _held.get(key)
        if held is not None:
            held.count += 1
            return key
        path.parent.mkdir(parents=True, exist_ok=True)
        file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for as long as the lock is
        try:
            _lock_now(file)
        except BlockingIOError:
            other = _read_holder(file)
            file.close()
            raise WriterBusy(_busy_message(path.parent, what, other)) from None
        except BaseException:
            file.close()
            raise
        me = Holder(
            pid=os.getpid(), command=command or command_line(), since=time.time(), host=socket.gethostname(), what=what
        )
        _write(file, me)
        _held[key] = _Held(file, me, count=1)
        logger.debug("holding %s", path)
        return key


def _lock_now(file: IO[str], attempts: int = 25) -> None:
    """An exclusive lock without waiting for a holder, but through a `holder()` probe's moment-long
    shared lock. BlockingIOError: another process holds it."""
    for attempt in range(attempts):
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt + 1 == attempts:
                raise
            time.sleep(0.02)


def _release(key: str) -> None:
    with _guard:
        held = _held[key]
        held.count -= 1
        if held.count > 0:
            return
        del _held[key]
        # The file stays (truncating it first would race with the next holder writing itself in); the
        # lock goes with the descriptor.
        held.file.close()


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _write(file: IO[str], who: Holder) -> None:
    file.seek(0)
    file.truncate()
    data: dict[str, Any] = {
        "pid": who.pid,
        "command": who.command,
        "since": who.since,
        "host": who.host,
        "what": who.what,
        "retries": list(who.retries),
    }
    file.write(json.dumps(data))
    file.flush()


def _read_holder(file: IO[str]) -> Holder | None:
    # The holder may have taken the lock a moment ago and not written itself in yet.
    for _ in range(20):
        file.seek(0)
        found = Holder.parse(file.read())
        if found is not None:
            return found
        time.sleep(0.01)
    return None


def _busy_message(data_dir: Path, what: str, other: Holder | None) -> str:
    who = other.describe() if other is not None else "another process (it has not said which yet)"
    return (
        f"another clipdex process is already indexing {what or 'this source'} into {data_dir}: {who}. "
        "One writer per source of items: stop it first, or let it do the work. Beside it you can index "
        "another folder or Kafka into the same store, search (`clipdex serve`, `clipdex mcp`), read "
        "`clipdex status` and `clipdex dlq list`, run `clipdex compact`, and `clipdex dlq retry` (the "
        "running indexer retries its own items)."
    )
