"""`clipdex migrate`: a SQLite store copied to Milvus and back, vectors and all, without a model call;
resumable after a stop; and the command itself."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from shared.config import Settings
from shared.embedder import Embedder
from shared.migrate import migrate
from shared.stores import PortableStore, open_portable, open_reader
from shared.types import Filters
from tests.conftest import clipdex_command, milvus_env, milvus_settings_for, tiny_settings_for
from tests.sample_store import fill_data_dir


def snapshot(store: PortableStore) -> tuple[dict[str, tuple[object, ...]], list[tuple[object, ...]]]:
    """Every item (with its vector) and every dead letter, as comparable values."""
    items = {
        s.item.id: (
            s.item.source,
            s.item.uri,
            s.item.sha256,
            s.item.metadata,
            s.item.status,
            s.item.reason,
            s.item.version,
            round(s.item.created_at.timestamp(), 3),
            None if s.embedding is None else tuple(np.round(s.embedding, 5)),
        )
        for chunk in store.export_items()
        for s in chunk
    }
    letters = sorted(
        (d.source, d.item_id, d.payload, d.reason, d.tries, round(d.created_at.timestamp(), 3))
        for d in store.export_dead_letters()
    )
    return items, letters


@pytest.fixture
def filled(tmp_path: Path, tiny_embedder: Embedder, milvus_uri: str) -> Settings:
    """A SQLite store with images, catalog items, a failed item and a dead letter; Milvus settings beside it."""
    settings = milvus_settings_for(tmp_path / "data", milvus_uri, allowed_roots=[str(tmp_path)])
    fill_data_dir(settings.model_copy(update={"store": "sqlite"}), tiny_embedder, tmp_path / "images")
    return settings


def test_sqlite_to_milvus_and_back_keeps_everything(filled: Settings, tiny_embedder: Embedder, tmp_path: Path) -> None:
    identity = tiny_embedder.identity
    sqlite = open_portable(filled, "sqlite", None)
    milvus = open_portable(filled, "milvus", identity)
    assert sqlite is not None and milvus is not None
    report = migrate(sqlite, milvus, chunk=7)
    assert (report.items, report.copied, report.dead_letters, report.interrupted) == (45, 45, 1, False)
    assert snapshot(milvus) == snapshot(sqlite)
    assert milvus.model_identity() == identity

    again = migrate(sqlite, milvus)
    assert (again.copied, again.dead_letters) == (0, 0)  # a re-run writes nothing twice

    back_settings = tiny_settings_for(tmp_path / "back")
    back = open_portable(back_settings, "sqlite", identity)
    assert back is not None
    migrate(milvus, back)
    assert snapshot(back) == snapshot(sqlite)
    for store in (sqlite, milvus, back):
        store.close()

    # the copy answers searches like the original, with no model call for stored vectors
    with open_reader(filled, identity) as m, open_reader(back_settings, identity) as s:
        query = s.vectors.item_vector("kafka:sku-3")
        assert query is not None
        assert [h.id for h in m.vectors.search(query, 5).hits] == [h.id for h in s.vectors.search(query, 5).hits]
        # filters too: the imported SQLite store has its filter tags (a filter is looked up in them first)
        hats = Filters(metadata={"category": "hats", "year": 2021}, source="kafka")
        got = [[h.id for h in side.vectors.search(query, 50, hats).hits] for side in (m, s)]
        assert got[0] == got[1] and len(got[0]) > 3


def test_a_stopped_migration_resumes_where_it_stopped(filled: Settings, tiny_embedder: Embedder) -> None:
    sqlite = open_portable(filled, "sqlite", None)
    milvus = open_portable(filled, "milvus", tiny_embedder.identity)
    assert sqlite is not None and milvus is not None
    stop = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int, copied: int) -> None:
        seen.append(done)
        stop.set()  # as a signal would, after the first chunk

    first = migrate(sqlite, milvus, chunk=10, stop=stop, progress=progress)
    assert (first.copied, first.interrupted, first.dead_letters) == (10, True, 0)
    assert seen == [10]
    rest = migrate(sqlite, milvus, chunk=10)
    assert (rest.items, rest.copied, rest.dead_letters) == (45, 35, 1)
    assert snapshot(milvus) == snapshot(sqlite)
    sqlite.close()
    milvus.close()


def test_the_command_migrates_and_says_what_to_set(filled: Settings, milvus_uri: str) -> None:
    assert filled.milvus_collection is not None
    env = milvus_env(filled.data_dir, milvus_uri, filled.milvus_collection)
    done = subprocess.run(
        [*clipdex_command(), "migrate", "--to", "milvus", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "migrated 45 items" in done.stdout and "45 copied" in done.stdout and "1 dead letters" in done.stdout
    assert "CLIPDEX_STORE=milvus" in done.stdout
    status = subprocess.run(
        [*clipdex_command(), "status"], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert "44 indexed, 1 failed, 1 dead letters" in status.stdout and "Milvus at" in status.stdout
