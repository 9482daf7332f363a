"""Search latency and recall@10 of the FAISS main index, flat vs IVF vs HNSW, through the real code path.

N synthetic 512-d unit vectors (bench/vectors.py: faiss's SyntheticDataset, normalised, by default; or
--dataset clip-like, a clustered Gaussian mixture on the sphere; never uniform noise) are written to a
real SQLite store and compacted into a main index of each kind with `indexer.compaction.compact`; a
`LiveIndex` loads it from disk as a query process would, and answers one query at a time. Recall@10 is
measured against exact search (faiss IndexFlatIP, all threads) over the same vectors; queries come from
the same distribution but are not in the base.

    python bench/bench_index_search.py --quick                 # 20k vectors, about a minute
    python bench/bench_index_search.py --sizes 100000 1000000  # the figures in bench/RESULTS.md

For each size it prints one row per configuration: build (compaction) seconds, p50/p99 latency of
LiveIndex.search, recall@10, and the baseline p50 of the same index searched with two OpenMP threads
per query (what LiveIndex did before it pinned searches to one thread). Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from vectors import DATASETS, base_and_queries

from indexer.compaction import compact
from shared.config import Settings
from shared.roles import Upsert
from shared.sqlite.index import IndexParams, LiveIndex, index_kind
from shared.sqlite.store import SqliteStore

K = 10


@dataclass
class Row:
    n: int
    config: str
    kind: str
    build_s: float
    p50_ms: float
    p99_ms: float
    recall: float
    omp2_p50_ms: float | None = None


def default_params(**overrides: Any) -> IndexParams:
    """The automatic defaults of Settings (and of the environment's CLIPDEX_* variables), with overrides."""
    params = IndexParams.from_settings(Settings())
    return replace(params, compact_delta_size=10**9, compact_max_age_s=1e12, **overrides)


def fill_store(store: SqliteStore, base: np.ndarray, batch: int = 20_000) -> float:
    started = time.perf_counter()
    for lo in range(0, len(base), batch):
        ups = [
            Upsert(f"api:{i}", "api", f"mem://{i}", f"{i:064x}", {}, base[i])
            for i in range(lo, min(lo + batch, len(base)))
        ]
        store.apply(upserts=ups)
    return time.perf_counter() - started


def latencies(index: LiveIndex, queries: np.ndarray) -> tuple[list[float], list[set[int]]]:
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = index.search(q, K)
        times.append(time.perf_counter() - t)
        found.append({vid for vid, _ in hits})
    return times, found


def omp2_p50(index: Any, queries: np.ndarray) -> float:
    """The old path: the same main searched with the process's default OpenMP threads (2 here)."""
    faiss.omp_set_num_threads(os.cpu_count() or 2)
    times = []
    for q in queries:
        t = time.perf_counter()
        index.search(q.reshape(1, -1), K)
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 50) * 1e3)


def recall(found: list[set[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(f & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))


@dataclass
class Build:
    name: str
    params: IndexParams  # how main is built
    searches: list[tuple[str, IndexParams]]  # search-time variants of the same main (nprobe, efSearch)


def run_size(n: int, nq: int, work: Path, builds: list[Build], flat_queries: int, dataset: str) -> list[Row]:
    print(f"\n== {n:,} vectors ({dataset}), {nq} queries ==", flush=True)
    base, queries = base_and_queries(n, nq, dataset=dataset)
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    _, truth_pos = exact.search(queries, K)
    truth = truth_pos + 1  # vector ids are assigned 1..n in insertion order
    del exact
    store_dir = work / f"n{n}"
    shutil.rmtree(store_dir, ignore_errors=True)
    store = SqliteStore(store_dir / "db.sqlite3")
    print(f"store filled in {fill_store(store, base):.1f} s", flush=True)
    del base
    rows = []
    for number, build in enumerate(builds):
        index_dir = store_dir / f"index-{number}"  # a fresh directory: compaction rebuilds main from the store
        result = compact(store, build.params, 512, index_dir)
        print(f"{build.name}: built {result.kind} in {result.seconds:.1f} s", flush=True)
        for name, params in build.searches:
            live = LiveIndex(store, 512, params, index_dir)
            live.refresh()
            kind = index_kind(live._main.index)
            qs = queries[:flat_queries] if kind == "flat" else queries
            latencies(live, qs[:20])  # warm up
            times, found = latencies(live, qs)
            row = Row(
                n=n,
                config=name,
                kind=kind,
                build_s=result.seconds,
                p50_ms=float(np.percentile(times, 50) * 1e3),
                p99_ms=float(np.percentile(times, 99) * 1e3),
                recall=recall(found, truth[: len(qs)]),
                omp2_p50_ms=omp2_p50(live._main.index, qs[:100]),
            )
            rows.append(row)
            print(
                f"  {name:<40} p50 {row.p50_ms:7.2f} ms  p99 {row.p99_ms:7.2f} ms  recall@10 {row.recall:.3f}  "
                f"(2 OpenMP threads: p50 {row.omp2_p50_ms:.2f} ms)",
                flush=True,
            )
            del live
        shutil.rmtree(index_dir, ignore_errors=True)
    store.close()
    shutil.rmtree(store_dir, ignore_errors=True)
    return rows


def builds_for(n: int, args: argparse.Namespace) -> list[Build]:
    flat = default_params(kind="flat")
    out = [Build("flat", flat, [("flat", flat)])]
    auto = default_params()
    ann = default_params(kind=auto.choose_kind(max(n, auto.ann_threshold)))
    label = f"auto defaults ({ann.kind}, nlist {ann.nlist(n)}, nprobe {ann.nprobe(ann.nlist(n))})"
    if ann.kind == "hnsw":
        label = f"auto defaults (hnsw, M {ann.hnsw_m}, efSearch {ann.hnsw_ef_search})"
    out.append(Build(label, ann, [(label, ann)]))
    for nlist in args.nlist:
        built = default_params(kind="ivf", ivf_nlist=nlist)
        searches = [(f"ivf nlist {nlist} nprobe {p}", replace(built, ivf_nprobe=p)) for p in args.nprobe]
        out.append(Build(f"ivf nlist {nlist}", built, searches))
    if n <= args.hnsw_max:
        built = default_params(kind="hnsw", hnsw_m=args.hnsw_m)
        searches = [(f"hnsw M {args.hnsw_m} efSearch {ef}", replace(built, hnsw_ef_search=ef)) for ef in args.ef_search]
        out.append(Build(f"hnsw M {args.hnsw_m}", built, searches))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k vectors, 200 queries")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--flat-queries", type=int, default=200, help="queries for the (slow) flat main")
    parser.add_argument("--nlist", type=int, nargs="*", default=[], help="extra IVF nlist values to sweep")
    parser.add_argument("--nprobe", type=int, nargs="*", default=[16, 32, 64])
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-search", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--hnsw-max", type=int, default=200_000, help="skip HNSW above this size (slow build)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="faiss-synthetic")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.queries, args.flat_queries = [20_000], 200, 100
    logging.basicConfig(level=logging.ERROR)  # the rebuilds from the store warn; that is the point here
    work = args.workdir or Path(tempfile.mkdtemp(prefix="clipdex-bench-"))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, faiss {faiss.__version__}")
    print(f"load average at start: {os.getloadavg()}")
    rows: list[Row] = []
    try:
        for n in args.sizes:
            rows += run_size(n, args.queries, work, builds_for(n, args), args.flat_queries, args.dataset)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()}")
    print("\n| vectors | config | kind | build s | p50 ms | p99 ms | recall@10 | p50 ms, 2 OpenMP threads |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r.n:,} | {r.config} | {r.kind} | {r.build_s:.1f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
            f"{r.recall:.3f} | {r.omp2_p50_ms:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
