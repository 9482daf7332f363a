"""One status, behind `clipdex status`, the MCP tool `index_status` and the HTTP API: what the store
holds, how fresh it is, and how far the running indexers lag behind their sources.

    read_status(data_dir, catalog, searcher=...) ─▶ Status
        catalog.stats()          counts, the stored index (generation, delta), newest, last compaction
        catalog.spaces()         the model; a re-embed in progress (its coverage), a previous model kept
        read_heartbeats()        each indexer's state, lag and pending events (files other processes wrote),
                                 and a running re-embed's rate and ETA
        searcher.state()         a server's own index: its size, how far behind the store it is, and the
                                 model that answers its queries

Reads only: no model, no index load; quick enough for every status call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.heartbeat import REEMBED, read_heartbeat, read_heartbeats
from shared.roles import Catalog, Coverage, DeadLetter, SearcherState, Space, StoreStats
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
class Reembed:
    """A re-embed in progress: the new model, how far its shadow space is, and the speed of the process
    filling it (none: paused, `clipdex reembed` again resumes it)."""

    model: ModelIdentity
    started_at: datetime | None
    coverage: Coverage
    running: bool
    rate: float  # items per second
    eta_s: float | None
    pid: int | None

    def to_dict(self) -> dict[str, Any]:
        cov = self.coverage
        return {
            "model": _model(self.model),
            "started_at": _iso(self.started_at),
            "state": "running" if self.running else "paused",
            "done": cov.done + cov.failed,
            "total": cov.total,
            "failed": cov.failed,
            "remaining": cov.remaining,
            "rate": self.rate,
            "eta_s": self.eta_s,
            "pid": self.pid,
        }


@dataclass(frozen=True)
class Previous:
    """The model before the last switch, kept a grace period for search processes still switching."""

    model: ModelIdentity
    retired_at: datetime | None
    removed_after: datetime | None  # None: the grace period is not known here

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": _model(self.model),
            "retired_at": _iso(self.retired_at),
            "removed_after": _iso(self.removed_after),
        }


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
    reembed: Reembed | None = None
    previous: Previous | None = None
    switch_error: str | None = None  # the asking server could not follow the store's new model: why
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
            "model": None if model is None else _model(model),
            "newest_indexed_at": _iso(s.newest_indexed_at),
            "last_compaction_at": _iso(s.last_compaction_at),
            "lag_s": self.lag_s,
            "pending": self.pending,
            "indexers": self.indexers,
            "reembed": None if self.reembed is None else self.reembed.to_dict(),
            "previous_model": None if self.previous is None else self.previous.to_dict(),
        }


def read_status(
    data_dir: Path,
    catalog: Catalog | None,
    *,
    searcher: SearcherState | None = None,
    recent_dead_letters: int = 0,
    grace_s: float | None = None,
    store: str = "",
) -> Status:
    """The status of the store (`catalog` None: there is none yet) and of the indexers whose heartbeats
    are in `data_dir` (with the Milvus store, the indexers of this machine that use that directory).
    `grace_s`: how long a previous model is kept after a switch (CLIPDEX_REEMBED_GRACE_S), to say until
    when."""
    reembed, previous = None, None
    if catalog is None:
        model, stats, recent = None, NO_STORE, []
    else:
        model, stats = catalog.model_identity(), catalog.stats()
        recent = catalog.dead_letters(limit=recent_dead_letters) if recent_dead_letters else []
        spaces = catalog.spaces()
        reembed = _reembed(data_dir, catalog, spaces)
        previous = _previous(spaces, grace_s)
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
        reembed=reembed,
        previous=previous,
        store=store,
    )


def _reembed(data_dir: Path, catalog: Catalog, spaces: list[Space]) -> Reembed | None:
    shadow = next((s for s in spaces if s.state == "shadow"), None)
    if shadow is None or shadow.model is None:
        return None
    beat = read_heartbeat(data_dir / REEMBED) if data_dir.is_dir() else None
    running = beat is not None and beat.get("state") == "running" and beat.get("space") == shadow.id
    rate = float(beat.get("rate") or 0.0) if running and beat else 0.0
    eta = beat.get("eta_s") if running and beat else None
    return Reembed(
        model=shadow.model,
        started_at=shadow.created_at,
        coverage=catalog.coverage(shadow.id),
        running=running,
        rate=rate,
        eta_s=float(eta) if isinstance(eta, int | float) else None,
        pid=int(beat["pid"]) if running and beat and isinstance(beat.get("pid"), int) else None,
    )


def _previous(spaces: list[Space], grace_s: float | None) -> Previous | None:
    retired = [s for s in spaces if s.state in ("retired", "dropping") and s.model is not None]
    if not retired:
        return None
    last = retired[-1]
    assert last.model is not None
    until = None
    if last.switched_at is not None and grace_s is not None:
        until = datetime.fromtimestamp(last.switched_at.timestamp() + grace_s, tz=last.switched_at.tzinfo)
    return Previous(last.model, last.switched_at, until)


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


def _model(model: ModelIdentity) -> dict[str, Any]:
    return {"name": model.name, "pretrained": model.pretrained, "dim": model.dim}
