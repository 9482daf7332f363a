"""The two stores on the same data in one run: ingest, query latency and freshness, SQLite + FAISS against
Milvus.

    python -m bench.bench_milvus                        # 5,000 vectors (512-d), a milvus-lite server process
    python -m bench.bench_milvus --quick                # 1,000 vectors
    python -m bench.bench_milvus --milvus-uri http://milvus:19530 --vectors 1000000   # a real Milvus

What is measured is the store, through the roles the indexer and the servers use (`Writer.apply` in
micro-batches of 64, `VectorSearch.search` top 10, `item_vector`), with synthetic unit vectors and
catalog-like metadata: no model, so the figures are the stores' own. Freshness: from `apply` returning in
the writer to the item found by a search of a reader with its own connection (SQLite: its FAISS index
refreshed as a server refreshes it, here as fast as it can poll; Milvus: the replica's Bounded search).

HONEST LABEL: without --milvus-uri, "milvus" is milvus-lite, a test engine written in Python that speaks
Milvus's gRPC API. Its latency and throughput are NOT Milvus's: a real Milvus runs segments and indexes in
C++ (HNSW via AUTOINDEX), on query nodes that scale out. The milvus-lite figures here show the cost of the
round trips and of the backend's write pattern (5 calls per micro-batch), and that the same data gives the
same answers; measure Milvus itself with --milvus-uri on the deployment you mean to run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shared.config import Settings, load_settings
from shared.roles import Upsert
from shared.stores import open_reader, open_writer
from shared.types import Filters, ModelIdentity

DIM = 512
BATCH = 64
MODEL = ModelIdentity("bench-512", "none", DIM, "be" * 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_milvus_lite(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or "milvus-lite"
    port = free_port()
    cmd = [binary, "server", "--data-dir", str(data), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("milvus-lite did not start")


def dataset(n: int, seed: int = 0) -> tuple[np.ndarray, list[Upsert]]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ups = [
        Upsert(
            f"kafka:sku-{i}",
            "kafka",
            f"https://img.example.com/sku-{i}.jpg",
            f"{i:064x}",
            {"category": ("shoes", "hats", "bags", "coats")[i % 4], "year": 2020 + i % 5, "title": f"item {i}"},
            vectors[i],
            1,
        )
        for i in range(n)
    ]
    return vectors, ups


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1000


def measure(name: str, settings: Settings, vectors: np.ndarray, ups: list[Upsert], queries: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with open_writer(settings, MODEL) as w:
        started = time.perf_counter()
        batch_s = []
        for lo in range(0, len(ups), BATCH):
            t = time.perf_counter()
            w.writer.apply(upserts=ups[lo : lo + BATCH])
            batch_s.append(time.perf_counter() - t)
        out["ingest_per_s"] = len(ups) / (time.perf_counter() - started)
        out["batch_p50_ms"] = pct(batch_s, 50)
        # a replay of the same batches: idempotent, and what a restarted indexer costs
        t = time.perf_counter()
        for lo in range(0, min(len(ups), 10 * BATCH), BATCH):
            w.writer.apply(upserts=ups[lo : lo + BATCH])
        out["replay_batch_ms"] = (time.perf_counter() - t) / max(1, min(len(ups), 10 * BATCH) // BATCH) * 1000

        with open_reader(settings, MODEL) as r:
            r.vectors.refresh()
            rng = np.random.default_rng(1)
            picks = rng.integers(0, len(ups), queries)
            for label, filters in (("search", None), ("filtered", Filters(metadata={"category": "hats"}))):
                lat = []
                for i in picks:
                    q = vectors[i] + 0.05 * rng.standard_normal(DIM).astype(np.float32)
                    t = time.perf_counter()
                    hits = r.vectors.search(q / np.linalg.norm(q), 10, filters).hits
                    lat.append(time.perf_counter() - t)
                    assert hits, "no hits"
                out[f"{label}_p50_ms"], out[f"{label}_p95_ms"] = pct(lat, 50), pct(lat, 95)
            lat = []
            for i in picks[:queries]:
                t = time.perf_counter()
                assert r.vectors.item_vector(ups[i].id) is not None
                lat.append(time.perf_counter() - t)
            out["item_vector_p50_ms"] = pct(lat, 50)
            out["freshness_p50_ms"], out["freshness_p95_ms"] = freshness(w.writer.apply, r, min(30, queries))
            # the same answers from both stores, checked by the caller
            out["_top"] = [h.id for h in r.vectors.search(vectors[7], 10).hits]  # type: ignore[assignment]
    print(f"  {name}: done", file=sys.stderr)
    return out


def freshness(apply: Callable[..., object], reader: object, n: int) -> tuple[float, float]:
    """apply() returns in the writer -> a reader (own connection) finds the item."""
    vectors = reader.vectors  # type: ignore[attr-defined]
    rng = np.random.default_rng(2)
    waits = []
    for k in range(n):
        v = rng.standard_normal(DIM).astype(np.float32)
        v /= np.linalg.norm(v)
        item = f"kafka:fresh-{k}"
        apply(upserts=[Upsert(item, "kafka", "u", f"fresh-{k}", {}, v, 1)])
        t = time.perf_counter()
        while True:
            vectors.refresh()
            hits = vectors.search(v, 1)
            if hits and hits[0].id == item:
                break
            if time.perf_counter() - t > 30:
                raise RuntimeError("never became visible")
        waits.append(time.perf_counter() - t)
    return pct(waits, 50), pct(waits, 95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="1,000 vectors, 30 queries")
    parser.add_argument("--milvus-uri", help="a real Milvus (default: start a milvus-lite server process)")
    args = parser.parse_args()
    if args.quick:
        args.vectors, args.queries = 1000, 30
    vectors, ups = dataset(args.vectors)
    tmp = Path(tempfile.mkdtemp(prefix="bench-milvus-"))
    proc = None
    try:
        uri = args.milvus_uri
        if uri is None:
            proc, uri = start_milvus_lite(tmp / "milvus")
        engine = "Milvus" if args.milvus_uri else "milvus-lite (a Python test engine: NOT Milvus's speed)"
        base = {"model": "bench", "pretrained": "none", "device": "cpu"}
        sqlite = load_settings(data_dir=tmp / "sqlite", **base)
        milvus = load_settings(
            data_dir=tmp / "scratch", store="milvus", milvus_uri=uri, milvus_collection=f"bench_{os.getpid()}", **base
        )
        results = {
            "sqlite + FAISS (flat)": measure("sqlite", sqlite, vectors, ups, args.queries),
            f"milvus: {engine}": measure("milvus", milvus, vectors, ups, args.queries),
        }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(15)
        shutil.rmtree(tmp, ignore_errors=True)

    tops = [r.pop("_top") for r in results.values()]
    print(f"\n{args.vectors} vectors of {DIM} dims, micro-batches of {BATCH}, {args.queries} queries (top 10)")
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"same top 10 from both stores: {tops[0] == tops[1]}\n")
    rows = [
        ("ingest, vectors/s", "ingest_per_s", "{:.0f}"),
        ("one micro-batch of 64, p50 ms", "batch_p50_ms", "{:.1f}"),
        ("the same batch replayed, ms", "replay_batch_ms", "{:.1f}"),
        ("search top 10, p50 ms", "search_p50_ms", "{:.1f}"),
        ("search top 10, p95 ms", "search_p95_ms", "{:.1f}"),
        ("search + metadata filter, p50 ms", "filtered_p50_ms", "{:.1f}"),
        ("stored vector by id, p50 ms", "item_vector_p50_ms", "{:.1f}"),
        ("write -> found by a reader, p50 ms", "freshness_p50_ms", "{:.1f}"),
        ("write -> found by a reader, p95 ms", "freshness_p95_ms", "{:.1f}"),
    ]
    names = list(results)
    print("| figure | " + " | ".join(names) + " | ratio |")
    print("| --- | " + " | ".join("---" for _ in names) + " | --- |")
    for label, key, fmt in rows:
        a, b = (results[n][key] for n in names)
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {b / a if a else float('nan'):.1f}x |")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
