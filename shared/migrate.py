"""Copy a store to the other backend without re-embedding: `clipdex migrate --to milvus|sqlite`.

    source ─export_items (chunks of 1,000)─▶ drop what the target holds already (states) ─▶ import_items
           ─export_dead_letters─────────────▶ import_dead_letters (those the target does not hold)

Items keep their ids, vectors, versions, statuses, reasons and times; the model identity goes with them.
Resumable: run it again after a stop (or a failure) and it skips the items whose state (content hash,
version, status, vector) the target already holds, so only the rest is written. The source is only read;
stop the indexers first, or run it again after they stop, so nothing written meanwhile is left behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.roles import StoredItem, StoredState
from shared.stores import PortableStore

Progress = Callable[[int, int, int], None]  # (items done, items in all, of them copied)


@dataclass
class MigrationReport:
    items: int = 0  # read from the source
    copied: int = 0  # written to the target
    dead_letters: int = 0  # copied
    seconds: float = 0.0
    interrupted: bool = False


def migrate(
    source: PortableStore,
    target: PortableStore,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    chunk: int = 1000,
) -> MigrationReport:
    """Copy items, vectors and dead letters from `source` into `target` (bound to the source's model)."""
    started = time.monotonic()
    report = MigrationReport()
    stats = source.stats()
    total = stats.items + stats.failed
    for batch in source.export_items(chunk):
        held = target.states([s.item.id for s in batch])
        todo = [s for s in batch if not _held(held.get(s.item.id), s)]
        if todo:
            target.import_items(todo)
        report.items += len(batch)
        report.copied += len(todo)
        if progress is not None:
            progress(report.items, max(total, report.items), report.copied)
        if stop is not None and stop.is_set():
            report.interrupted = True
            break
    else:
        report.dead_letters = target.import_dead_letters(source.export_dead_letters())
    report.seconds = time.monotonic() - started
    return report


def _held(state: StoredState | None, stored: StoredItem) -> bool:
    item = stored.item
    return state is not None and (state.sha256, state.version, state.status, state.has_vector) == (
        item.sha256,
        item.version,
        item.status,
        stored.embedding is not None,
    )
