"""Memory per stored vector: SQLite bytes on disk (float32 and float16 embeddings) and index RAM.

N synthetic 512-d unit vectors (bench/vectors.py) are written through SqliteStore.apply with a typical catalog
item (a 40-character id, a 60-character URL, a 64-hex sha256, two metadata keys), in batches of 1000.
Disk is the database file after a WAL checkpoint, per vector. Index RAM is measured two ways for flat,
IVF and HNSW mains: the process's resident memory before and after LiveIndex loads the main from disk
in a fresh process (the figure a query server pays), and faiss.serialize_index's size (what the file holds).

    python bench/bench_memory.py --quick        # 20k vectors
    python bench/bench_memory.py                # 200k vectors

Not part of the test run.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
from vectors import base_and_queries

from indexer.compaction import compact
from shared.config import Settings
from shared.roles import Upsert
from shared.sqlite.index import IndexParams
from shared.sqlite.store import SqliteStore

DIM = 512


def fill(path: Path, base: np.ndarray, dtype: str, page_size: int | None = None) -> int:
    if page_size is not None:  # a file made with this page size before the store opens it (the old default)
        db = sqlite3.connect(path)
        db.execute(f"PRAGMA page_size = {page_size}")
        db.execute("VACUUM")
        db.close()
    with SqliteStore(path, vector_dtype=dtype) as store:
        for lo in range(0, len(base), 1000):
            store.apply(
                upserts=[
                    Upsert(
                        f"kafka:catalog-item-{i:012d}-{'x' * 12}",
                        "kafka",
                        f"https://images.example.com/catalog/2024/{i:012d}/main-photo.jpg",
                        f"{i:064x}",
                        {"brand": "acme", "category": "shoes"},
                        base[i],
                    )
                    for i in range(lo, min(lo + 1000, len(base)))
                ]
            )
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return path.stat().st_size


LOADER = """
import gc, os, sys
from dataclasses import replace
from pathlib import Path
from shared.config import Settings
from shared.sqlite.index import IndexParams, LiveIndex
from shared.sqlite.store import SqliteStore

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

store = SqliteStore(Path(sys.argv[1]))
params = replace(IndexParams.from_settings(Settings()), kind=sys.argv[3])
live = LiveIndex(store, 512, params, Path(sys.argv[2]))
gc.collect()
before = rss()
live.refresh()
gc.collect()
print(rss() - before)
"""


def index_ram(db: Path, store: SqliteStore, params: IndexParams, index_dir: Path) -> tuple[int, int, str]:
    """(resident bytes a fresh query process takes to load main, serialized bytes, kind)."""
    result = compact(store, params, DIM, index_dir)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", LOADER, str(db), str(index_dir), params.kind],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    serialized = len(faiss.serialize_index(faiss.read_index(str(index_dir / f"main-{result.generation}.faiss"))))
    return int(out.stdout.split()[-1]), serialized, result.kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-n", type=int, default=200_000)
    args = parser.parse_args()
    n = 20_000 if args.quick else args.n
    logging.basicConfig(level=logging.ERROR)  # each main is rebuilt from the store on purpose; no warnings
    work = Path(tempfile.mkdtemp(prefix="clipdex-mem-"))
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, faiss {faiss.__version__}; {n:,} x {DIM}"
    )
    try:
        base, _ = base_and_queries(n, 0, DIM)
        print("\n| store | bytes on disk per vector | of which the embedding |")
        print("| --- | ---: | ---: |")
        for dtype, page_size in (("float32", None), ("float16", None), ("float32", 4096), ("float16", 4096)):
            size = fill(work / f"{dtype}-{page_size}.sqlite3", base, dtype, page_size)
            label = f"SQLite, {dtype} embeddings" + (
                f", {page_size // 1024} KiB pages (the old default)" if page_size else ""
            )
            print(f"| {label} | {size / n:,.0f} | {DIM * np.dtype(dtype).itemsize:,} |", flush=True)
        defaults = replace(IndexParams.from_settings(Settings()), compact_delta_size=10**9, compact_max_age_s=1e12)
        print("\n| main index | RAM per vector (RSS after load) | serialized per vector |")
        print("| --- | ---: | ---: |")
        with SqliteStore(work / "float32-None.sqlite3") as store:
            for label, params in (
                ("flat", replace(defaults, kind="flat")),
                ("IVF (defaults)", replace(defaults, kind="ivf")),
                (f"HNSW M={defaults.hnsw_m}", replace(defaults, kind="hnsw")),
            ):
                index_dir = work / f"index-{label.split()[0]}"
                taken, serialized, kind = index_ram(work / "float32-None.sqlite3", store, params, index_dir)
                print(f"| {label} ({kind}) | {taken / n:,.0f} | {serialized / n:,.0f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
