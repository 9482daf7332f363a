"""The folder source for real: a real folder, real watchfiles, the tiny CLIP, SQLite and FAISS in tmp_path.

A reader with its own store connection and index (as a search server in another process has) checks what
a user would see."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from indexer import pipeline as pipeline_module
from indexer import service as service_module
from indexer.commands import status_of
from indexer.service import index_folder, watch_folder
from indexer.sources.folder import FolderSummary
from shared.config import Settings
from shared.core import Core, build_core
from shared.errors import FetchFailed
from shared.roles import DeadLetter
from shared.sqlite.store import SqliteStore
from tests.conftest import tiny_settings_for

pytestmark = pytest.mark.integration


def jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "drop"
    path.mkdir()
    return path


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tiny_settings_for(tmp_path / "data", watch_settle_ms=500, max_batch_wait_ms=50)


@dataclass
class Watcher:
    stop: asyncio.Event
    task: asyncio.Task[FolderSummary]

    async def finish(self) -> FolderSummary:
        self.stop.set()
        return await asyncio.wait_for(self.task, 30)


@asynccontextmanager
async def watching(settings: Settings, root: Path) -> AsyncIterator[Watcher]:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(watch_folder(settings, root, stop, ready=ready))
    ready_wait = asyncio.create_task(ready.wait())
    await asyncio.wait({task, ready_wait}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    ready_wait.cancel()
    if task.done():
        task.result()  # raises what stopped it
    assert ready.is_set(), "the watcher did not get ready"
    watcher = Watcher(stop, task)
    try:
        yield watcher
    finally:
        if not task.done():
            await watcher.finish()


async def until(check: Callable[[], Any], within_s: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


@pytest.fixture
def reader(settings: Settings) -> Any:
    """What a separate search process sees (opened lazily, once the store exists)."""
    cores: list[Core] = []

    def get() -> Core:
        if not cores:
            cores.append(build_core(settings))
        cores[0].vectors.refresh()
        return cores[0]

    yield get
    for core in cores:
        core.close()


def stored(settings: Settings, item_id: str) -> Any:
    with SqliteStore(settings.db_path) as store:
        return store.get_item(item_id)


def write_slowly(path: Path, data: bytes, pieces: int, pause_s: float, still_unindexed: Callable[[], bool]) -> bool:
    """Write `data` in pieces, like a slow copy; True if nothing was indexed before the last piece."""
    clean = True
    step = len(data) // pieces + 1
    with open(path, "wb") as fh:
        for start in range(0, len(data), step):
            fh.write(data[start : start + step])
            fh.flush()
            time.sleep(pause_s)
            if start + step < len(data):
                clean = clean and still_unindexed()
    return clean


async def test_a_file_written_slowly_in_chunks_is_indexed_once_when_complete(settings: Settings, root: Path) -> None:
    data = jpeg(1)
    async with watching(settings, root) as watcher:
        # pauses shorter than the settle time, and longer than the quick release of a whole image
        clean = await asyncio.to_thread(
            write_slowly, root / "slow.jpg", data, 6, 0.25, lambda: stored(settings, "folder:drop/slow.jpg") is None
        )
        assert clean, "a half-written file was indexed"
        item = await until(lambda: stored(settings, "folder:drop/slow.jpg"), what="the slow file to be indexed")
        await asyncio.sleep(1.0)  # time for a second, wrong indexing to show up if there were one
        summary = await watcher.finish()
    assert item.status == "indexed" and item.sha256 == hashlib.sha256(data).hexdigest()
    assert (summary.indexed, summary.failed) == (1, 0)
    with SqliteStore(settings.db_path) as store:
        assert store.stats().dead_letters == 0 and store.stats().vectors == 1


async def test_rename_reuses_the_vector_and_delete_removes_from_search(
    settings: Settings, root: Path, reader: Callable[[], Core]
) -> None:
    (root / "a.jpg").write_bytes(jpeg(1))
    (root / "b.jpg").write_bytes(jpeg(2))
    (root / "sub").mkdir()
    async with watching(settings, root) as watcher:  # both found by the start-up scan
        core = reader()
        vector_a = core.vectors.item_vector("folder:drop/a.jpg")
        vector_b = core.vectors.item_vector("folder:drop/b.jpg")
        assert vector_a is not None and vector_b is not None

        os.rename(root / "a.jpg", root / "sub" / "renamed.jpg")
        await until(
            lambda: core.vectors.item_vector("folder:drop/sub/renamed.jpg") is not None, what="the renamed file"
        )
        moved = core.vectors.item_vector("folder:drop/sub/renamed.jpg")
        await until(lambda: core.catalog.get_item("folder:drop/a.jpg") is None, what="the old name to go")
        assert np.array_equal(moved, vector_a)

        assert "folder:drop/b.jpg" in {h.id for h in reader().search.search_vector(vector_b, 5)}
        (root / "b.jpg").unlink()
        await until(lambda: core.catalog.get_item("folder:drop/b.jpg") is None, what="the delete")
        hits = {h.id for h in reader().search.search_vector(vector_b, 5)}
        assert "folder:drop/b.jpg" not in hits and "folder:drop/sub/renamed.jpg" in hits
        summary = await watcher.finish()
    assert (summary.indexed, summary.reused, summary.deleted) == (2, 1, 2)  # the rename needed no model call


async def test_files_added_while_the_watcher_was_down_are_indexed_at_the_next_start(
    settings: Settings, root: Path
) -> None:
    (root / "kept.jpg").write_bytes(jpeg(1))
    (root / "removed.jpg").write_bytes(jpeg(2))
    async with watching(settings, root):
        pass
    assert stored(settings, "folder:drop/removed.jpg") is not None

    (root / "removed.jpg").unlink()
    (root / "deep" / "er").mkdir(parents=True)
    (root / "deep" / "er" / "new.png").write_bytes(_png(3))
    (root / "new.jpg.part").write_bytes(jpeg(4))  # ignored: a download in progress
    (root / ".hidden.jpg").write_bytes(jpeg(5))
    (root / "notes.txt").write_text("not an image")
    async with watching(settings, root) as watcher:
        with SqliteStore(settings.db_path) as store:
            assert sorted(store.item_ids(source="folder")) == ["folder:drop/deep/er/new.png", "folder:drop/kept.jpg"]
        os.rename(root / "new.jpg.part", root / "new.jpg")  # the download completes
        await until(lambda: stored(settings, "folder:drop/new.jpg"), what="the completed download")
        summary = await watcher.finish()
    assert (summary.unchanged, summary.indexed, summary.deleted, summary.failed) == (1, 2, 1, 0)


async def test_polling_mode_sees_new_files(settings: Settings, root: Path) -> None:
    polling = settings.model_copy(update={"watch_polling": True})
    async with watching(polling, root):
        (root / "polled.jpg").write_bytes(jpeg(7))
        item = await until(lambda: stored(polling, "folder:drop/polled.jpg"), what="the polled file")
        status = await until(lambda: (s := status_of(polling))["pending"] == 0 and s, what="nothing pending")
        assert status["items"] == 1 and status["lag_s"] == 0.0  # caught up
        (watcher,) = status["indexers"]
        assert watcher["state"] == "running" and watcher["root"] == str(root) and watcher["pid"] == os.getpid()
    assert item.status == "indexed"
    assert status_of(polling)["indexers"][0]["state"] == "stopped" and status_of(polling)["lag_s"] is None


def _png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg(seed, (64, 64)))).save(out, format="PNG")
    return out.getvalue()


# -- transient failures, two folders, ids from before folder names ------------------------------------------------


@pytest.fixture
def flaky_share(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """File names that fail with EIO, as on a network share that is away for a while (the set is live)."""
    failing: set[str] = set()
    real = pipeline_module.fetch_bytes

    def fetch(uri: str, policy: Any) -> bytes:
        if os.path.basename(uri) in failing:
            raise FetchFailed(f"{uri}: input/output error (EIO)")
        return real(uri, policy)

    monkeypatch.setattr(pipeline_module, "fetch_bytes", fetch)
    monkeypatch.setattr(service_module, "_REDELIVER_CHECK_S", 0.1)
    return failing


async def test_a_file_that_failed_transiently_is_retried_while_watching_and_at_the_next_start(
    settings: Settings, root: Path, flaky_share: set[str]
) -> None:
    quick = settings.model_copy(update={"fetch_retries": 0, "dlq_retry_delay_s": 0.3})
    (root / "ok.jpg").write_bytes(jpeg(1))
    (root / "share.jpg").write_bytes(jpeg(2))
    flaky_share.add("share.jpg")
    async with watching(quick, root) as watcher:
        letter = await until(lambda: _letters(quick), what="the dead letter")
        assert letter[0].retriable and letter[0].retry_at is not None
        flaky_share.clear()  # the share is back; the file itself never changed
        item = await until(
            lambda: (i := stored(quick, "folder:drop/share.jpg")) and i.vector_id and i, what="the retry"
        )
        assert item.reason is None and _letters(quick) == []
        await watcher.finish()

    no_retries = quick.model_copy(update={"dlq_retries": 0})
    (root / "later.jpg").write_bytes(jpeg(3))
    flaky_share.add("later.jpg")
    async with watching(no_retries, root):
        await until(lambda: _letters(no_retries), what="the dead letter")
    flaky_share.clear()
    async with watching(no_retries, root) as watcher:  # unchanged, but its failure was transient: tried again
        summary = await watcher.finish()
    assert summary.indexed == 1 and stored(settings, "folder:drop/later.jpg").vector_id is not None


def _letters(settings: Settings) -> list[DeadLetter]:
    with SqliteStore(settings.db_path) as store:
        return store.dead_letters()


async def test_two_folders_with_the_same_file_names_keep_their_own_items(tmp_path: Path, settings: Settings) -> None:
    """Two folders indexed into one data directory overwrote each other's items (ids were the paths)."""
    first, second = tmp_path / "a" / "shots", tmp_path / "b" / "shots"
    for folder, seed in ((first, 1), (second, 2)):
        folder.mkdir(parents=True)
        (folder / "cat.jpg").write_bytes(jpeg(seed))
    await index_folder(settings, first)
    await index_folder(settings, second)
    summary = await index_folder(settings, first)  # the other folder's item is not a deletion of this one's
    assert (summary.deleted, summary.unchanged) == (0, 1)
    with SqliteStore(settings.db_path) as store:
        a, b = store.get_item("folder:shots/cat.jpg"), store.get_item("folder:shots-2/cat.jpg")
        assert a is not None and b is not None and a.vector_id != b.vector_id
        assert (a.uri, b.uri) == (str(first / "cat.jpg"), str(second / "cat.jpg"))


async def test_a_store_from_before_folder_names_keeps_its_vectors(settings: Settings, root: Path) -> None:
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(jpeg(i))
    await index_folder(settings, root)
    with SqliteStore(settings.db_path) as store:  # as an older clipdex left it: ids are the paths
        vectors = {i.id.removeprefix("folder:drop/"): i.vector_id for i in store.items()}
        with store._write() as db:
            db.execute("UPDATE items SET id = 'folder:' || substr(id, length('folder:drop/') + 1)")
            db.execute("DELETE FROM folders")
    summary = await index_folder(settings, root)
    assert (summary.indexed, summary.unchanged, summary.deleted) == (0, 3, 0)  # nothing embedded again
    with SqliteStore(settings.db_path) as store:
        assert {i.id: i.vector_id for i in store.items()} == {f"folder:drop/{k}": v for k, v in vectors.items()}
