"""The folder source: a directory of images, reconciled against the store at start, then watched.

    start: watch ─┐  scan ─▶ reconcile (new, changed, deleted since the last run) ─┐
                  └▶ changes ─▶ settler (size + mtime hold still) ────────────────┴▶ micro-batcher
                                                              ─▶ sink.write ─▶ log line + heartbeat

- Item ids are `folder:<name>/<path relative to the root, posix>`, where `<name>` is the folder's own
  name in the store (`Writer.register_folder`: `images`, or `images-2` for a second folder called so),
  so two folders indexed into one store never share an id; the uri is the absolute path. The metadata
  holds the relative path, the size and the mtime: a file whose size and mtime match its item is
  unchanged, and is not even read at the next start.
- A store from before names (ids `folder:<path>`) is adopted at the first start: the items under the
  folder get their new ids in one write, keeping their vectors (`Writer.rename_items`).
- A file that failed is tried again when it changes; one whose failure was transient (a timeout, EIO on
  a share) also at every start, and by the running indexer's retries meanwhile (`indexer.redeliver`).
- Hidden and temporary names (dotfiles, `.part`, `.tmp`, `.crdownload`, `~`...) and non-image files
  are ignored, in subfolders too. Symlinks to files are followed, and one that leads out of the root
  becomes a dead letter (the pipeline refuses it).
- A rename is a delete and an add with the same content: the pipeline reuses the stored vector.
- The watcher starts before the scan, so a file that arrives during the scan is seen by one or both.
- Nothing to commit: the store is the position. A file added while the indexer was down is found by
  the next start's scan.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from watchfiles import Change, awatch

from indexer.batcher import MicroBatcher
from indexer.events import MAX_ID_LENGTH, Event
from indexer.records import BatchReport, Record, Sink
from indexer.sources.settle import FileStat, Settled, Settler
from shared.config import Settings
from shared.errors import ConfigError
from shared.heartbeat import Heartbeat
from shared.roles import Catalog
from shared.types import Item, namespaced_id

logger = logging.getLogger(__name__)

SOURCE = "folder"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".swp", ".filepart", "~")


def ignored_name(name: str) -> bool:
    """Hidden and temporary names: what editors, browsers and copy tools write before the final name."""
    return name.startswith((".", "~$")) or name.lower().endswith(TEMP_SUFFIXES)


def is_image(rel: str) -> bool:
    parts = rel.split("/")
    return not any(ignored_name(p) for p in parts) and os.path.splitext(parts[-1])[1].lower() in IMAGE_SUFFIXES


# -- scanning and reconciling ------------------------------------------------------------------------------


def scan(root: Path, under: str = "") -> dict[str, FileStat]:
    """Every image file below `root` (or its subfolder `under`): relative posix path → size and mtime."""
    out: dict[str, FileStat] = {}
    top = root / under if under else root
    for dirpath, dirnames, filenames in os.walk(top, onerror=_scan_error):
        dirnames[:] = sorted(d for d in dirnames if not ignored_name(d))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(path, root)).as_posix()
            if not is_image(rel) or not _usable(rel):
                continue
            stat = FileStat.of(path)
            if stat is not None:
                out[rel] = stat
    return out


def _scan_error(exc: OSError) -> None:
    logger.warning("cannot list %s: %s", exc.filename, exc.strerror)


def _usable(rel: str) -> bool:
    """Can this path be an item id? Names that are not UTF-8, or too long, are skipped with a warning."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        logger.warning("skipping %r: its name is not valid UTF-8", rel)
        return False
    if len(rel) > MAX_ID_LENGTH:
        logger.warning("skipping %s...: a path of more than %d characters", rel[:80], MAX_ID_LENGTH)
        return False
    return True


@dataclass(frozen=True)
class Folder:
    """A folder and its name in the store: its items' ids are `folder:<name>/<path in the folder>`."""

    root: Path  # absolute
    name: str

    @property
    def prefix(self) -> str:
        """What every item id of this folder starts with."""
        return namespaced_id(SOURCE, self.name + "/")

    def event_id(self, rel: str) -> str:
        return f"{self.name}/{rel}"

    def item_id(self, rel: str) -> str:
        return namespaced_id(SOURCE, self.event_id(rel))

    def rel_of(self, item_id: str) -> str | None:
        """The path in the folder of one of its items; None for another folder's item."""
        return item_id[len(self.prefix) :] if item_id.startswith(self.prefix) else None


@dataclass
class Reconciliation:
    upserts: list[tuple[str, FileStat]] = field(default_factory=list)  # new or changed since the last run
    deletes: list[str] = field(default_factory=list)  # indexed, and gone from the folder
    unchanged: int = 0
    failed_before: int = 0  # failed for good at an earlier run, and not modified since
    foreign: int = 0  # folder items of another folder, left alone
    renames: dict[str, str] = field(default_factory=dict)  # ids from before folder names -> their new ids


def reconcile(
    folder: Folder, files: dict[str, FileStat], items: Iterable[Item], folders: Mapping[str, str] = {}
) -> Reconciliation:
    """Compare the folder with the store's folder items, without reading any file. `folders`: every
    folder registered in the store (name -> path), to tell an item from before folder names apart."""
    out = Reconciliation()
    under = str(folder.root) + os.sep
    stored: dict[str, Item] = {}
    for item in items:
        rel = folder.rel_of(item.id)
        if rel is None and _from_before_names(item, under, folders):
            rel = item.uri[len(under) :]
            out.renames[item.id] = folder.item_id(rel)
            item = replace(item, id=folder.item_id(rel))
        if rel is None:
            out.foreign += 1
        else:
            stored[rel] = item
    for rel, stat in files.items():
        known = stored.get(rel)
        if known is None:
            out.upserts.append((rel, stat))
        elif known.reason is None and known.vector_id is not None and _same_file(known, stat):
            out.unchanged += 1
        elif known.reason is not None and not known.retriable and stat.mtime_ns <= known.updated_at.timestamp() * 1e9:
            out.failed_before += 1  # it failed for good after its last change: trying again would fail again
        else:
            out.upserts.append((rel, stat))  # new, changed, or its last failure was transient
    out.deletes = sorted(set(stored) - set(files))
    return out


def _from_before_names(item: Item, under: str, folders: Mapping[str, str]) -> bool:
    """An item of this folder written before folders had names: `folder:<path in the folder>`, and not
    an item of a registered folder (nested in this one) that happens to read the same."""
    if not item.uri.startswith(under) or item.id != namespaced_id(SOURCE, item.uri[len(under) :]):
        return False
    name, _, rest = item.id.removeprefix(f"{SOURCE}:").partition("/")
    return not (name in folders and item.uri == os.path.join(folders[name], rest))


def _same_file(item: Item, stat: FileStat) -> bool:
    return item.metadata.get("bytes") == stat.size and item.metadata.get("mtime_ns") == stat.mtime_ns


# -- records -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilePosition:
    """A folder record's position: the file's state when it was read, and when the change was seen."""

    stat: FileStat | None
    seen_at: float


def upsert_record(folder: Folder, rel: str, stat: FileStat, seen_at: float) -> Record:
    metadata = {"path": rel, "bytes": stat.size, "mtime_ns": stat.mtime_ns}
    fields = {"op": "upsert", "id": folder.event_id(rel), "uri": str(folder.root / rel), "metadata": metadata}
    return _record(fields, FilePosition(stat, seen_at))


def delete_record(folder: Folder, rel: str, seen_at: float) -> Record:
    return _record({"op": "delete", "id": folder.event_id(rel)}, FilePosition(None, seen_at))


def root_of(record: Record) -> Path | None:
    """The watched folder a folder record came from: its uri minus its relative path."""
    event = record.event
    if record.source != SOURCE or not isinstance(event, Event) or not event.uri:
        return None
    return root_from(record.source, event.uri, event.metadata)


def root_from(source: str, uri: str, metadata: Mapping[str, Any]) -> Path | None:
    """The watched folder of a folder item (its uri is the absolute path; its metadata, the relative one)."""
    rel = metadata.get("path")
    if source == SOURCE and isinstance(rel, str) and uri.endswith("/" + rel):
        return Path(uri[: -len(rel) - 1])
    return None


def _record(fields: dict[str, Any], position: FilePosition) -> Record:
    try:
        event = Event.model_validate(fields)
    except ValidationError as exc:  # e.g. a path longer than an id may be
        return Record(SOURCE, str(fields.get("uri") or fields["id"]), None, f"invalid event: {exc}", position)
    return Record(SOURCE, event.model_dump_json(exclude_none=True), event, None, position)


# -- the source --------------------------------------------------------------------------------------------


@dataclass
class FolderSummary:
    """What a run did, summed over its batches."""

    files: int = 0  # image files found by the scan
    batches: int = 0
    records: int = 0
    indexed: int = 0
    reused: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed: int = 0
    failed_before: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    def add(self, report: BatchReport) -> None:
        self.batches += 1
        self.records += report.records
        self.indexed += report.indexed
        self.reused += report.reused
        self.unchanged += report.unchanged
        self.deleted += report.deleted
        self.failed += report.failed
        self.failures.extend((f.name, f.reason) for f in report.failures)


Progress = Callable[[int, int, FolderSummary], None]


Rename = Callable[[Mapping[str, str]], int]  # Writer.rename_items


class FolderSource:
    def __init__(
        self,
        folder: Folder,
        sink: Sink,
        catalog: Catalog,
        rename: Rename,
        *,
        batch_size: int = 64,
        max_wait_s: float = 0.2,
        settle_s: float = 0.5,
        force_polling: bool = False,
        poll_delay_ms: int = 300,
        heartbeat: Heartbeat | None = None,
        tick_s: float = 0.05,
    ) -> None:
        if not folder.root.is_dir():
            raise ConfigError(f"{folder.root} is not a directory")
        self.folder = replace(folder, root=Path(os.path.abspath(folder.root)))
        self.root = self.folder.root
        self.sink = sink
        self.catalog = catalog
        self.rename = rename
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.force_polling = force_polling
        self.poll_delay_ms = poll_delay_ms
        self.heartbeat = heartbeat
        self.tick_s = tick_s
        self.settler = Settler(self.root, settle_s)
        self.batcher: MicroBatcher[Record] = MicroBatcher(batch_size, max_wait_s)
        self.summary = FolderSummary()
        self._initial: set[str] = set()  # event ids the start-up scan found to do, not yet written
        self._fed = False
        self._ready = False

    @classmethod
    def from_settings(
        cls,
        folder: Folder,
        sink: Sink,
        catalog: Catalog,
        rename: Rename,
        settings: Settings,
        *,
        heartbeat: Heartbeat | None = None,
    ) -> FolderSource:
        return cls(
            folder,
            sink,
            catalog,
            rename,
            batch_size=settings.batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1000,
            settle_s=settings.watch_settle_ms / 1000,
            force_polling=settings.watch_polling,
            heartbeat=heartbeat,
        )

    # -- one shot ---------------------------------------------------------------------------------------

    async def index_once(self, stop: asyncio.Event | None = None, progress: Progress | None = None) -> FolderSummary:
        """Bring the store in line with the folder as it is now, and return what changed."""
        started = time.monotonic()
        found = await asyncio.to_thread(self._reconcile)
        now = time.time()
        records = [upsert_record(self.folder, rel, stat, now) for rel, stat in found.upserts]
        records += [delete_record(self.folder, rel, now) for rel in found.deletes]
        done = 0
        if progress is not None:
            progress(done, len(records), self.summary)
        for start in range(0, len(records), self.batch_size):
            if stop is not None and stop.is_set():
                self.summary.interrupted = True
                break
            batch = records[start : start + self.batch_size]
            await self._write(batch)
            done += len(batch)
            if progress is not None:
                progress(done, len(records), self.summary)
        self.summary.seconds = time.monotonic() - started
        self._beat("stopped")
        return self.summary

    # -- continuous -------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> FolderSummary:
        """Reconcile, then watch, until `stop` is set; the batch in flight is finished first.

        `ready` is set once the watcher is live and the files found at start are indexed."""
        started = time.monotonic()
        halt = asyncio.Event()
        errors: list[BaseException] = []
        helpers: list[asyncio.Task[None]] = []

        def spawn(coro: Coroutine[Any, Any, None], name: str) -> None:
            async def guarded() -> None:
                try:
                    await coro
                except Exception as exc:
                    logger.exception("folder source: %s failed", name)
                    errors.append(exc)
                    halt.set()

            helpers.append(asyncio.create_task(guarded(), name=f"clipdex-folder-{name}"))

        watching = asyncio.Event()
        spawn(_forward(stop, halt), "stop")
        spawn(self._watch(halt, watching), "watch")
        try:
            await _first_of(watching, halt)
            if not halt.is_set():
                found = await asyncio.to_thread(self._reconcile)
                logger.info(
                    "watching %s%s: %d new or changed, %d deleted, %d unchanged since the last run",
                    self.root,
                    " (polling)" if self.force_polling else "",
                    len(found.upserts),
                    len(found.deletes),
                    found.unchanged,
                )
                spawn(self._feed(found, halt, ready), "scan")
                spawn(self._tick(halt), "settle")
                await self._consume(halt, ready)
        finally:
            halt.set()
            for task in helpers:
                if task.get_name() != "clipdex-folder-watch":
                    task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            self.summary.seconds = time.monotonic() - started
            self._beat("stopped")
        if errors:
            raise errors[0]
        return self.summary

    async def _consume(self, halt: asyncio.Event, ready: asyncio.Event | None) -> None:
        while not halt.is_set():
            batch = await self.batcher.next_batch(halt)
            if batch:
                # A StoreError stops the source here; nothing is lost: the store is the position.
                await self._write(batch)
                self._initial.difference_update(r.event.id for r in batch if r.event is not None)
            self._check_ready(ready)

    def _check_ready(self, ready: asyncio.Event | None) -> None:
        if self._fed and not self._initial and not self._ready:
            self._ready = True
            logger.info("%s: the files found at start are indexed; watching for changes", self.root)
            if ready is not None:
                ready.set()

    async def _watch(self, halt: asyncio.Event, watching: asyncio.Event) -> None:
        changes = awatch(
            self.root,
            watch_filter=self._wanted,
            stop_event=halt,
            # watchfiles yields once changes pause for `step` ms, or after `debounce` ms at the latest: with
            # its default of 1600 ms, a steady stream of files (one every 50 ms) waited 1.6 s for each batch.
            debounce=150,
            step=30,
            force_polling=self.force_polling,
            poll_delay_ms=self.poll_delay_ms,
            recursive=True,
        )
        try:
            nxt = asyncio.ensure_future(anext(changes))
            # awatch creates its file system watcher synchronously on its first step, before it waits
            # for changes: once that step has run, nothing that happens in the folder can be missed.
            await asyncio.sleep(0)
            watching.set()
            while True:
                try:
                    batch = await nxt
                except StopAsyncIteration:
                    return
                await asyncio.to_thread(self._on_changes, batch)
                nxt = asyncio.ensure_future(anext(changes))
        finally:
            await changes.aclose()

    def _wanted(self, change: Change, path: str) -> bool:
        rel = os.path.relpath(path, self.root)
        return not rel.startswith("..") and not any(ignored_name(p) for p in Path(rel).parts)

    def _on_changes(self, changes: set[tuple[Change, str]]) -> None:
        """Blocking (a thread): hand each changed image to the settler; expand folders that came or went."""
        for change, path in changes:
            rel = Path(os.path.relpath(path, self.root)).as_posix()
            if rel == "." or rel.startswith("../") or not _usable(rel):
                continue
            if is_image(rel):
                self.settler.observe(rel)
            elif change == Change.deleted:
                # a folder moved away or removed: its files may not be reported one by one
                for item_id in self.catalog.item_ids(source=SOURCE, prefix=self.folder.item_id(rel + "/")):
                    self.settler.observe(item_id[len(self.folder.prefix) :])
            elif os.path.isdir(path):  # a folder moved in
                for sub, stat in scan(self.root, rel).items():
                    self.settler.observe(sub, stat)

    async def _feed(self, found: Reconciliation, halt: asyncio.Event, ready: asyncio.Event | None) -> None:
        """Queue what the start-up scan found (the queue is bounded: this waits for the indexer)."""
        now = time.time()
        fresh_after = time.time_ns() - int(self.settler.settle_s * 1e9)
        self._initial.update(self.folder.event_id(rel) for rel, _ in found.upserts)
        self._initial.update(self.folder.event_id(rel) for rel in found.deletes)
        records = []
        for rel, stat in found.upserts:
            if stat.mtime_ns > fresh_after:  # perhaps still being written: the settler decides when
                self.settler.observe(rel, stat, seen_at=now)
            else:
                records.append(upsert_record(self.folder, rel, stat, now))
        records += [delete_record(self.folder, rel, now) for rel in found.deletes]
        self._fed = True
        self._check_ready(ready)
        for record in records:
            if halt.is_set():
                return
            await self.batcher.put(record)

    async def _tick(self, halt: asyncio.Event) -> None:
        last_beat = 0.0
        while not halt.is_set():
            if len(self.settler):
                for settled in await asyncio.to_thread(self.settler.due):
                    await self.batcher.put(self._settled_record(settled))
            if time.monotonic() - last_beat > 2.0:
                self._beat("running")
                last_beat = time.monotonic()
            await asyncio.sleep(self.tick_s)

    def _settled_record(self, settled: Settled) -> Record:
        if settled.stat is None:
            return delete_record(self.folder, settled.rel, settled.seen_at)
        return upsert_record(self.folder, settled.rel, settled.stat, settled.seen_at)

    # -- shared ---------------------------------------------------------------------------------------------

    def _reconcile(self) -> Reconciliation:
        files = scan(self.root)
        found = reconcile(self.folder, files, self.catalog.items(source=SOURCE), self.catalog.folders())
        if found.renames:
            # in chunks: another source's indexer may be waiting to write (SQLite takes writes in turn)
            pairs = sorted(found.renames.items())
            renamed = sum(self.rename(dict(pairs[i : i + 5000])) for i in range(0, len(pairs), 5000))
            logger.info(
                "%s: %d items from before folder names now have ids %s... (their vectors are kept)",
                self.root,
                renamed,
                self.folder.prefix,
            )
        if found.foreign:
            logger.info("%d items of other folders are in this store; they are left alone", found.foreign)
        self.summary.files = len(files)
        self.summary.unchanged += found.unchanged
        self.summary.failed_before = found.failed_before
        return found

    async def _write(self, batch: Sequence[Record]) -> BatchReport:
        report = await self.sink.write(batch)
        self.summary.add(report)
        seen = [r.position.seen_at for r in batch if isinstance(r.position, FilePosition)]
        lag_ms = (time.time() - min(seen)) * 1000 if seen else 0.0
        logger.info(
            "batch source=folder size=%d %s lag_ms=%.0f pending=%d",
            len(batch),
            report.log_fields(),
            lag_ms,
            self.batcher.pending() + len(self.settler),
        )
        for failed in report.failures:
            logger.warning("dead letter: %s: %s", failed.name, failed.reason)
        self._beat("running", last_batch=report.summary(), lag_s=lag_ms / 1000)
        return report

    def _beat(self, state: str, **fields: Any) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat(state=state, pending=self.batcher.pending() + len(self.settler), **fields)


async def _forward(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
