"""Filtered searches at 100k items: bounded (filter tags, exact among few, a capped scan otherwise), and
what they do to the unfiltered queries running beside them. Before (the widening loop that read every item
while holding the store's lock) and after, in one run.

N 512-d unit vectors (ViT-B-32's width; bench/vectors.py's synthetic data) are written to a real SQLite
store with metadata (`category`: 20 values, `shard`: 1,000 values, `year`), compacted into the main index
the default settings choose (IVF at 100k), and searched through `IndexSearch` in this process, as a
server's worker threads search it. Query vectors, not text: the model's time is not what is measured.

    python bench/bench_filtered_search.py --quick        # 20k items, about two minutes
    python bench/bench_filtered_search.py                # 100k items: the figures in bench/RESULTS.md

Parts:
1. p50 of one search (top 10) for: a filter that matches nothing (a value no item has), a rare filter
   (0.1% of the items), a filter with a null condition that matches nothing (no index holds it: the capped
   scan), a common filter (5%), no filter; the new code, and the old loop where it finishes in reasonable time.
2. Concurrency: 2 threads run unfiltered searches back to back for a few seconds, alone (baseline) and
   with 2 more threads each sending 20 searches a second with the filter that matches nothing (the old
   loop cannot keep that pace: its threads run back to back), and, for scale, with 2 threads sending
   unfiltered searches at the same pace; p50 and p95 of the first two threads' searches, as ratios to the
   baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Set
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from vectors import base_and_queries

from indexer.compaction import compact
from shared.config import Settings
from shared.roles import Upsert
from shared.sqlite.index import IndexParams, LiveIndex, index_kind
from shared.sqlite.search import IndexSearch
from shared.sqlite.store import SqliteStore
from shared.types import Embedding, Filters, Hit

DIM = 512
K = 10


def build(data: Path, n: int) -> tuple[SqliteStore, LiveIndex, np.ndarray, float]:
    base, queries = base_and_queries(n, 200, DIM, "clip-like")
    store = SqliteStore(data / "db.sqlite3")
    params = replace(IndexParams.from_settings(Settings()), compact_delta_size=10**9, compact_max_age_s=1e12)
    started = time.perf_counter()
    for lo in range(0, n, 5000):
        store.apply(
            upserts=[
                Upsert(
                    f"kafka:sku-{i}",
                    "kafka",
                    f"https://img.example.com/{i}.jpg",
                    f"{i:064x}",
                    {"category": f"c{i % 20}", "shard": i % 1000, "year": 2000 + i % 25, "title": f"item {i}"},
                    base[i],
                )
                for i in range(lo, min(lo + 5000, n))
            ]
        )
    compact(store, params, DIM, data / "index")
    index = LiveIndex(store, DIM, params, data / "index")
    index.refresh()
    return store, index, queries, time.perf_counter() - started


def old_search(store: SqliteStore, index: LiveIndex, query: Embedding, top_k: int, filters: Filters) -> list[Hit]:
    """The loop this replaces (main before issue 14): widen x4 until top_k pass or the index is covered,
    reading the candidates' items in one call that held the store's lock throughout."""
    fetch = top_k * 4
    exclude: Set[str] = frozenset()
    while True:
        candidates = index.search(query, fetch)
        with store._lock:  # as the old items_for_vectors held it, across every chunk
            items = store.items_for_vectors([vid for vid, _ in candidates])
        hits = []
        for vid, score in candidates:
            item = items.get(vid)
            if item is None or item.id in exclude or not filters.matches(item):
                continue
            hits.append(Hit(item.id, item.uri, score, item.metadata))
            if len(hits) == top_k:
                return hits
        if len(candidates) < fetch:
            return hits
        fetch *= 4


def p50_ms(fn: Callable[[Embedding], Any], queries: np.ndarray, runs: int) -> float:
    times = []
    for q in queries[:runs]:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def concurrent(
    search: IndexSearch,
    queries: np.ndarray,
    seconds: float,
    noise: Callable[[Embedding], Any] | None,
    rate: float = 20.0,
) -> dict[str, float]:
    """Unfiltered top-10 searches in 2 threads (back to back) for `seconds`, with 2 threads of `noise`
    beside them, each at most `rate` a second."""
    stop = threading.Event()
    times: list[float] = []
    noise_done = [0]
    lock = threading.Lock()

    def unfiltered(offset: int) -> None:
        i = offset
        while not stop.is_set():
            t = time.perf_counter()
            search.search(queries[i % len(queries)], K)
            with lock:
                times.append(time.perf_counter() - t)
            i += 2

    def noisy(offset: int) -> None:
        assert noise is not None
        i = offset
        next_at = time.perf_counter()
        while not stop.is_set():
            noise(queries[(i * 7) % len(queries)])
            with lock:
                noise_done[0] += 1
            i += 1
            next_at += 1 / rate  # paced, as users send them; one that takes longer starts the next at once
            stop.wait(max(0.0, next_at - time.perf_counter()))

    threads = [threading.Thread(target=unfiltered, args=(o,)) for o in range(2)]
    if noise is not None:
        threads += [threading.Thread(target=noisy, args=(o,)) for o in range(2)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    ms = sorted(x * 1000 for x in times)
    return {
        "queries": len(ms),
        "p50_ms": statistics.median(ms),
        "p95_ms": ms[int(0.95 * (len(ms) - 1))],
        "filtered_done": noise_done[0],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="20k items, shorter runs")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each concurrency run")
    ap.add_argument("--old-runs", type=int, default=3, help="old-loop searches per case (each scans everything)")
    args = ap.parse_args(argv)
    n = 20_000 if args.quick else args.n
    seconds = 3.0 if args.quick else args.seconds

    with tempfile.TemporaryDirectory(prefix="clipdex-bench-filtered-") as tmp:
        store, index, queries, build_s = build(Path(tmp), n)
        search = IndexSearch(store, index)
        cases = {
            "matches nothing (value no item has)": Filters({"category": "none such"}),
            "rare (shard = 7: 0.1%)": Filters({"shard": 7}),
            "matches nothing (null condition: capped scan)": Filters({"title": None}),
            "common (category = c3: 5%)": Filters({"category": "c3"}),
            "no filter": Filters(),
        }
        single: dict[str, dict[str, Any]] = {}
        for name, filters in cases.items():
            new = p50_ms(lambda q, f=filters: search.search(q, K, f), queries, 41)  # type: ignore[misc]
            partial = search.search(queries[0], K, filters).partial
            old = None
            if name != "matches nothing (null condition: capped scan)" or args.old_runs:
                old = p50_ms(lambda q, f=filters: old_search(store, index, q, K, f), queries, args.old_runs)  # type: ignore[misc]
            single[name] = {"new_p50_ms": round(new, 2), "old_p50_ms": old and round(old, 1), "partial": partial}
            print(f"{name:48s} new p50 {new:8.2f} ms   old p50 {old or float('nan'):9.1f} ms   partial={partial}")

        nothing = cases["matches nothing (value no item has)"]
        runs = {
            "baseline (unfiltered only)": concurrent(search, queries, seconds, None),
            "with unfiltered at 2x20/s": concurrent(search, queries, seconds, lambda q: search.search(q, K)),
            "with filtered (new)": concurrent(search, queries, seconds, lambda q: search.search(q, K, nothing)),
            "with filtered (old loop)": concurrent(
                search, queries, seconds, lambda q: old_search(store, index, q, K, nothing)
            ),
        }
        base = runs["baseline (unfiltered only)"]
        for name, r in runs.items():
            r["p50_ratio"] = round(r["p50_ms"] / base["p50_ms"], 2)
            r["p95_ratio"] = round(r["p95_ms"] / base["p95_ms"], 2)
            print(
                f"{name:30s} unfiltered p50 {r['p50_ms']:7.2f} ms (x{r['p50_ratio']})  p95 {r['p95_ms']:7.2f} ms "
                f"(x{r['p95_ratio']})  {r['queries']} unfiltered, {r['filtered_done']} filtered"
            )
        result = {
            "n": n,
            "index": index_kind(index._main.index),
            "build_s": round(build_s, 1),
            "single": single,
            "concurrent": runs,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
        }
        store.close()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
