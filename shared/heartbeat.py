"""What a running indexer tells status readers in other processes (`clipdex status`, a server's
`index_status`): a small JSON file per source, and one for a running re-embed.

    <data dir>/indexer-<source>.json   {"source", "pid", "state", "updated_at", "lag_s", "pending", ...}
    <data dir>/reembed.json            {"pid", "state", "updated_at", "done", "total", "rate", "eta_s", ...}

Written by the indexer's sources (`Heartbeat`) atomically (temporary file, rename) after every batch and
every few seconds when idle, so a reader (`read_heartbeats`, `shared.status`) sees the last whole state,
and a file whose process is gone reads as stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_PREFIX = "indexer-"
REEMBED = "reembed.json"


class Heartbeat:
    def __init__(self, data_dir: Path, source: str, *, name: str | None = None, **fixed: Any) -> None:
        self.path = data_dir / (name or f"{_PREFIX}{source}.json")
        self.state: dict[str, Any] = {"source": source, "pid": os.getpid(), "started_at": time.time(), **fixed}

    @classmethod
    def reembed(cls, data_dir: Path, **fixed: Any) -> Heartbeat:
        """The re-embed's own file (not an indexer's: it has no lag)."""
        return cls(data_dir, "reembed", name=REEMBED, **fixed)

    def beat(self, *, state: str = "running", last_batch: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Record the current state; never raises (a status file is not worth stopping the indexer for)."""
        self.state.update(fields, state=state, updated_at=time.time())
        if last_batch is not None:
            self.state["last_batch"] = dict(last_batch)
            self.state["last_batch_at"] = time.time()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.state, default=str))
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.debug("cannot write %s: %s", self.path, exc)


def read_heartbeats(data_dir: Path) -> list[dict[str, Any]]:
    """The last state of each source's indexer; `state` is "stopped" when its process is gone."""
    return [s for path in sorted(data_dir.glob(f"{_PREFIX}*.json")) if (s := read_heartbeat(path)) is not None]


def read_heartbeat(path: Path) -> dict[str, Any] | None:
    """One heartbeat file; None when there is none. `state` is "stopped" when its process is gone."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    if state.get("state") == "running" and not _alive(state.get("pid")):
        state["state"] = "stopped"
    return state


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
