"""The index across processes and threads, on real files: a compactor killed with SIGKILL, a reader in another
process following a writer, and searches running through refreshes and compactions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.compaction import compact
from shared.core import Refresher
from shared.embedder import Embedder
from shared.roles import Delete, Upsert
from shared.search import SearchService
from shared.sqlite.index import IndexParams, LiveIndex
from shared.sqlite.search import IndexSearch
from shared.sqlite.store import SqliteStore

pytestmark = pytest.mark.integration

DIM = 16
PARAMS = IndexParams("flat", 200_000, None, None, 16, 64, 10**6, 1e9)
REPO = Path(__file__).resolve().parents[2]


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def put(store: SqliteStore, vecs: np.ndarray, prefix: str) -> dict[str, int]:
    ups = [
        Upsert(f"{prefix}-{i}", "api", f"mem://{prefix}-{i}", f"sha-{prefix}-{i}", {}, v) for i, v in enumerate(vecs)
    ]
    return dict(zip([u.id for u in ups], store.apply(upserts=ups).vector_ids, strict=True))


def brute_top(store: SqliteStore, query: np.ndarray, k: int) -> list[int]:
    ids, vecs = zip(*store.live_vectors(), strict=True)
    all_ids, mat = np.concatenate(ids), np.concatenate(vecs)
    return [int(all_ids[i]) for i in np.argsort(-(mat @ query), kind="stable")[:k]]


def python(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"child never reached {path.name}")
        time.sleep(0.02)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# -- a compactor killed with SIGKILL ---------------------------------------------------------------------------------

COMPACTOR = """
    import sys, time
    from pathlib import Path
    import faiss
    import shared.sqlite.index as index_module
    from indexer.compaction import compact
    from shared.sqlite.index import IndexParams
    from shared.sqlite.store import SqliteStore

    db, index_dir, where, flag = sys.argv[1:]

    def stop_here():
        Path(flag).touch()
        time.sleep(60)  # the parent kills us here

    if where == "mid-write":
        real_write = faiss.write_index
        def half_then_stop(index, path):
            real_write(index, path)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            stop_here()
        index_module.faiss.write_index = half_then_stop
    hook = stop_here if where == "before-swap" else None
    params = IndexParams("flat", 200_000, None, None, 16, 64, 10**6, 1e9)
    compact(SqliteStore(Path(db)), params, 16, Path(index_dir), before_swap=hook)
"""


@pytest.mark.parametrize("where", ["mid-write", "before-swap"])
def test_a_compactor_killed_with_sigkill_leaves_the_previous_generation_in_force(
    where: str, tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    rng = np.random.default_rng(1)
    store = SqliteStore(tmp_path / "db.sqlite3")
    put(store, unit_vectors(rng, 300), "a")
    compact(store, PARAMS, DIM, tmp_path / "index")  # generation 1
    put(store, unit_vectors(rng, 40), "b")
    store.apply(deletes=[Delete(f"a-{i}") for i in range(25)])
    reader = LiveIndex(store, DIM, PARAMS, tmp_path / "index")
    reader.refresh()

    flag = tmp_path / "reached"
    proc = python(COMPACTOR, str(tmp_path / "db.sqlite3"), str(tmp_path / "index"), where, str(flag))
    children.append(proc)
    wait_for(flag, proc)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL

    assert store.index_meta().generation == 1
    queries = unit_vectors(rng, 5)
    fresh = LiveIndex(store, DIM, PARAMS, tmp_path / "index")
    fresh.refresh()
    reader.refresh()
    for live in (fresh, reader):
        assert live.generation == 1
        for q in queries:
            assert [vid for vid, _ in live.search(q, 10)] == brute_top(store, q, 10)
    # The lock died with the process: the next compaction goes through, and the leftovers are cleaned up.
    assert compact(store, PARAMS, DIM, tmp_path / "index").generation == 2
    assert sorted(p.name for p in (tmp_path / "index").glob("main-*")) == ["main-1.faiss", "main-2.faiss"]
    reader.refresh()
    for q in queries:
        assert [vid for vid, _ in reader.search(q, 10)] == brute_top(store, q, 10)
    store.close()


# -- a reader in another process -------------------------------------------------------------------------------------

READER = """
    import json, sys, threading
    from pathlib import Path
    import numpy as np
    from shared.sqlite.index import IndexParams, LiveIndex
    from shared.sqlite.store import SqliteStore

    # What a query server does (shared.core.Refresher), without importing torch: a quick start.
    db, index_dir, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
    params = IndexParams("flat", 200_000, None, None, 16, 64, 10**6, 1e9)
    index = LiveIndex(SqliteStore(Path(db)), 16, params, Path(index_dir))
    index.refresh()
    stop = threading.Event()

    def follow():
        while not stop.wait(interval):
            index.refresh()

    threading.Thread(target=follow, daemon=True).start()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        query = np.array(json.loads(line), dtype=np.float32)
        hits = index.search(query, 5)
        print(json.dumps({"ids": [vid for vid, _ in hits], "generation": index.generation}), flush=True)
    stop.set()
"""


class Reader:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert json.loads(line or "{}").get("ready"), proc.stderr.read() if proc.stderr else ""

    def ask(self, query: np.ndarray) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(query.tolist()) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def until(self, query: np.ndarray, check: Any, timeout: float) -> float:
        """Seconds until the reader's answer passes `check`."""
        started = time.monotonic()
        while True:
            answer = self.ask(query)
            if check(answer):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"the reader did not catch up in {timeout} s: {answer}")
            time.sleep(0.01)


def test_a_reader_in_another_process_sees_writes_deletes_and_compactions_within_its_refresh_interval(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    interval = 0.2
    slack = 1.5  # process scheduling on a busy 2-core machine
    rng = np.random.default_rng(2)
    store = SqliteStore(tmp_path / "db.sqlite3")
    put(store, unit_vectors(rng, 100), "base")
    proc = python(READER, str(tmp_path / "db.sqlite3"), str(tmp_path / "index"), str(interval))
    children.append(proc)
    reader = Reader(proc)

    probe = unit_vectors(rng, 1)[0]
    vid = put(store, probe[None, :], "new")["new-0"]
    lag = reader.until(probe, lambda a: a["ids"][:1] == [vid], interval + slack)

    store.apply(deletes=[Delete("new-0")])
    lag = max(lag, reader.until(probe, lambda a: vid not in a["ids"], interval + slack))

    compact(store, PARAMS, DIM, tmp_path / "index")
    lag = max(lag, reader.until(probe, lambda a: a["generation"] == 1, interval + slack))
    assert reader.ask(probe)["ids"] == brute_top(store, probe, 5)

    # A delete of a vector in main (a tombstone), and a new one in the delta after the new generation.
    top = brute_top(store, probe, 1)[0]
    store.apply(deletes=[Delete(store.items_for_vectors([top])[top].id)])
    lag = max(lag, reader.until(probe, lambda a: top not in a["ids"], interval + slack))
    assert reader.ask(probe)["ids"] == brute_top(store, probe, 5)
    assert lag <= interval + slack
    proc.stdin.close()  # type: ignore[union-attr]
    assert proc.wait(timeout=10) == 0
    store.close()


# -- searches through refreshes and compactions, in threads -----------------------------------------------------------


def test_searches_never_return_a_deleted_item_while_writes_refreshes_and_compactions_run(
    tmp_path: Path, tiny_embedder: Embedder
) -> None:
    rng = np.random.default_rng(3)
    store = SqliteStore(tmp_path / "db.sqlite3")
    put(store, unit_vectors(rng, 200), "seed")
    index = LiveIndex(store, DIM, PARAMS, tmp_path / "index")
    index.refresh()
    service = SearchService(IndexSearch(store, index), store, tiny_embedder)
    refresher = Refresher(index.refresh, 0.01)
    refresher.start()
    deleted_at: dict[str, float] = {}  # item id -> when its delete committed
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    searches = [0]

    def writer() -> None:
        for step in range(60):
            put(store, unit_vectors(rng, 4), f"w{step}")
            doomed = [f"w{step}-0", f"seed-{step}"]
            store.apply(deletes=[Delete(d) for d in doomed])
            with lock:
                for d in doomed:
                    deleted_at[d] = time.monotonic()
            time.sleep(0.005)

    def compactor() -> None:
        while not stop.is_set():
            compact(store, PARAMS, DIM, tmp_path / "index")
            time.sleep(0.05)

    def searcher(seed: int) -> None:
        queries = unit_vectors(np.random.default_rng(seed), 20)
        while not stop.is_set():
            for q in queries:
                started = time.monotonic()
                hits = service.search_vector(q, 10)
                with lock:
                    stale = [h.id for h in hits if deleted_at.get(h.id, float("inf")) < started]
                assert not stale, f"deleted items returned: {stale}"
                assert len(hits) == 10 and len({h.id for h in hits}) == 10
                searches[0] += 1

    def guarded(fn: Any, *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        return threading.Thread(target=run)

    threads = [guarded(compactor), guarded(searcher, 10), guarded(searcher, 11), guarded(searcher, 12)]
    for t in threads:
        t.start()
    try:
        writer()
    finally:
        stop.set()
        for t in threads:
            t.join()
        refresher.stop()
    assert not errors, errors
    assert searches[0] > 50 and index.generation > 1
    index.refresh()
    for q in unit_vectors(rng, 5):
        assert [vid for vid, _ in index.search(q, 10)] == brute_top(store, q, 10)
    store.close()
