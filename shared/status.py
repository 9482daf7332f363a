"""One status, behind `clipdex status`, the MCP tool `index_status` and the HTTP API: what the store
holds, how fresh it is, and how far the running indexers lag behind their sources.

    read_status(data_dir, catalog, searcher=...) ─▶ Status
        catalog.stats()          counts, the stored index (generation, delta), newest, last compaction
        read_heartbeats()        each indexer's state, lag and pending events (files other processes wrote)
        searcher.state()         a server's own index: its size and how far behind the store it is

Reads only: no model, no index load; quick enough for every status call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.heartbeat import read_heartbeats
from shared.roles import Catalog, DeadLetter, SearcherState, StoreStats
from shared.types import ModelIdentity

NO_STORE = StoreStats(
    items=0,
    failed=0,
    vectors=0,
    dead_letters=0,
    tombstones=0,
    newest_indexed_at=None,
    last_compaction_at=None,
    generation=0,
    delta_size=0,
    delta_age_s=None,
    changes=0,
)


@dataclass(frozen=True)
class Status:
    data_dir: Path
    exists: bool  # False: no store yet (nothing indexed)
    model: ModelIdentity | None
    stats: StoreStats
    lag_s: float | None  # event to durable, of the slowest running indexer; None: none runs
    pending: int  # events the running indexers have seen and not yet written
    indexers: list[dict[str, Any]]  # each source's last heartbeat, with seconds_since_update
    recent_dead_letters: list[DeadLetter] = field(default_factory=list)
    searcher: SearcherState | None = None  # the asking server's own index, when a server asks
    store: str = ""  # where the store is, for people (`shared.stores.describe`); "" : the data dir

    def to_dict(self) -> dict[str, Any]:
        """As `clipdex status --json` prints it."""
        s = self.stats
        model = self.model
        return {
            "data_dir": str(self.data_dir),
            "store": self.store or str(self.data_dir),
            "exists": self.exists,
            "items": s.items,
            "failed": s.failed,
            "dead_letters": s.dead_letters,
            "dead_letters_retrying": s.retrying,
            "vectors": s.vectors,
            "tombstones": s.tombstones,
            "delta_size": s.delta_size,
            "delta_age_s": s.delta_age_s,
            "generation": s.generation,
            "model": None if model is None else {"name": model.name, "pretrained": model.pretrained, "dim": model.dim},
            "newest_indexed_at": _iso(s.newest_indexed_at),
            "last_compaction_at": _iso(s.last_compaction_at),
            "lag_s": self.lag_s,
            "pending": self.pending,
            "indexers": self.indexers,
        }


def read_status(
    data_dir: Path,
    catalog: Catalog | None,
    *,
    searcher: SearcherState | None = None,
    recent_dead_letters: int = 0,
    store: str = "",
) -> Status:
    """The status of the store (`catalog` None: there is none yet) and of the indexers whose heartbeats
    are in `data_dir` (with the Milvus store, the indexers of this machine that use that directory)."""
    if catalog is None:
        model, stats, recent = None, NO_STORE, []
    else:
        model, stats = catalog.model_identity(), catalog.stats()
        recent = catalog.dead_letters(limit=recent_dead_letters) if recent_dead_letters else []
    indexers = _indexers(data_dir)
    lag_s, pending = _lag(indexers)
    return Status(
        data_dir=data_dir,
        exists=catalog is not None,
        model=model,
        stats=stats,
        lag_s=lag_s,
        pending=pending,
        indexers=indexers,
        recent_dead_letters=recent,
        searcher=searcher,
        store=store,
    )


def _indexers(data_dir: Path) -> list[dict[str, Any]]:
    now = time.time()
    indexers = read_heartbeats(data_dir) if data_dir.is_dir() else []
    for hb in indexers:
        hb["seconds_since_update"] = round(now - float(hb.get("updated_at", now)), 1)
    return indexers


def _lag(indexers: list[dict[str, Any]]) -> tuple[float | None, int]:
    """Lag: from event to durable, as the last batch measured it, while anything is still pending; a
    running indexer with nothing pending has caught up. None when no indexer runs."""
    running = [hb for hb in indexers if hb.get("state") == "running"]
    lags = [
        float(hb.get("lag_s") or 0.0) if int(hb.get("pending") or 0) > 0 else 0.0
        for hb in running
        if isinstance(hb.get("lag_s", 0.0), int | float)
    ]
    pending = sum(int(hb.get("pending") or 0) for hb in running)
    return (round(max(lags), 3) if lags else None), pending


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat(timespec="seconds")
