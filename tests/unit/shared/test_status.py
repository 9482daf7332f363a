"""The one status behind `clipdex status`, the HTTP API and MCP: the store's counts, and the lag the
running indexers report in their heartbeat files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from shared.heartbeat import Heartbeat
from shared.roles import Failure, Upsert
from shared.sqlite.store import SqliteStore
from shared.status import read_status
from shared.types import ModelIdentity

CLI_KEYS = {
    "data_dir", "store", "exists", "items", "failed", "dead_letters", "dead_letters_retrying", "vectors",
    "tombstones", "delta_size", "delta_age_s",
    "generation", "model", "newest_indexed_at", "last_compaction_at", "lag_s", "pending", "indexers",
}  # fmt: skip


def test_no_store_yet_reads_as_empty_with_no_indexer(tmp_path: Path) -> None:
    status = read_status(tmp_path / "nothing-here", None)
    assert not status.exists and status.model is None and status.stats.items == 0
    assert (status.lag_s, status.pending, status.indexers) == (None, 0, [])
    assert set(status.to_dict()) == CLI_KEYS


def test_counts_model_and_recent_dead_letters_come_from_the_catalog(tmp_path: Path) -> None:
    vec = np.ones(4, np.float32) / 2
    with SqliteStore(tmp_path / "db.sqlite3") as store:
        store.bind_model(ModelIdentity("m", "none", 4, "c" * 64))
        store.apply(
            upserts=[Upsert("kafka:a", "kafka", "u", "h", {}, vec)],
            failures=[
                Failure("kafka", "{oops", "not JSON"),
                Failure("folder", "/x.jpg", "not an image", id="folder:x"),
            ],
        )
        status = read_status(tmp_path, store, recent_dead_letters=1)
    assert (status.stats.items, status.stats.failed, status.stats.dead_letters, status.stats.delta_size) == (1, 1, 2, 1)
    assert status.model is not None and status.model.dim == 4
    assert [d.reason for d in status.recent_dead_letters] == ["not an image"]  # the newest
    out = status.to_dict()
    assert out["model"] == {"name": "m", "pretrained": "none", "dim": 4} and out["exists"]
    json.dumps(out)  # plain data


def test_lag_is_the_slowest_running_indexer_with_work_pending(tmp_path: Path) -> None:
    Heartbeat(tmp_path, "kafka", topic="events").beat(pending=5, lag_s=2.5)
    Heartbeat(tmp_path, "folder", root="/images").beat(pending=0, lag_s=9.0)  # caught up: lag 0
    status = read_status(tmp_path, None)
    assert (status.lag_s, status.pending) == (2.5, 5)
    assert sorted(hb["source"] for hb in status.indexers) == ["folder", "kafka"]
    assert all(hb["seconds_since_update"] < 60 for hb in status.indexers)


def test_an_indexer_whose_process_is_gone_reads_as_stopped_and_has_no_lag(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    beat = Heartbeat(tmp_path, "kafka")
    beat.state["pid"] = int(gone.stdout)
    beat.beat(pending=7, lag_s=3.0)
    status = read_status(tmp_path, None)
    assert [hb["state"] for hb in status.indexers] == ["stopped"]
    assert (status.lag_s, status.pending) == (None, 0)
