"""`clipdex serve` on each runtime, side by side: HTTP text search latency and the server's memory.

A store of N synthetic unit vectors bound to ViT-B-32 (random weights: the same cost as trained ones) is
compacted into an IVF main index (reused from --workdir when it is already there). One `clipdex serve`
process per runtime (torch fp32, ONNX fp32, ONNX int8 by default) serves the same store at once; this
process sends one request at a time, going round the servers query by query, so every runtime sees the
same machine load. Each text query is distinct (every one pays for the text encoder); "cached" repeats one
query (the embedder's LRU cache), so uncached minus cached is the encoder as served. Memory is each
server's peak and final resident set (VmHWM, VmRSS), and on an empty store the model's share alone.

    python -m bench.bench_runtime_serve --items 20000 --queries 50          # a few minutes
    python -m bench.bench_runtime_serve --items 1000000 --workdir /tmp/rt   # the 1M figure

Not part of the test run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from bench.bench_search_api import (
    SERVER_PIDS,
    bench_settings,
    cpu_model,
    fill,
    free_port,
    percentiles,
    queries,
    server,
    time_http,
)
from indexer.compaction import compact
from shared.embedder import Embedder, ModelSpec
from shared.sqlite.index import IndexParams
from shared.sqlite.store import SqliteStore

RUNTIMES = ["torch:fp32", "onnx:fp32", "onnx:int8"]


def memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = round(int(value.split()[0]) / 1024, 0)
    return {"peak_rss_mb": fields["VmHWM"], "rss_mb": fields["VmRSS"]}


def prepare_store(data_dir: Path, n: int) -> None:
    settings = bench_settings(data_dir, index_kind="ivf")
    if settings.db_path.exists():
        print(f"reusing the store in {data_dir}", flush=True)
        return
    embedder = Embedder(ModelSpec("ViT-B-32", None, None, "cpu", "fp32", runtime="torch"))
    identity = embedder.identity
    embedder.close()
    with SqliteStore(settings.db_path) as store:
        store.bind_model(identity)
        print(f"filled {n:,} in {fill(store, n, identity.dim):.0f} s", flush=True)
        ivf = compact(store, IndexParams.from_settings(settings), identity.dim, settings.index_dir)
        print(f"IVF main built in {ivf.seconds:.0f} s", flush=True)


def prepare_exports(cache: Path, runtimes: list[str]) -> None:
    """Export once here, so no server spends its start (or the measurement) exporting."""
    for name in runtimes:
        runtime, precision = name.split(":")
        if runtime == "onnx":
            Embedder(ModelSpec("ViT-B-32", None, None, "cpu", precision, cache, 0, runtime)).load()


def serve_all(data_dir: Path, cache: Path, runtimes: list[str], workdir: Path, stack: ExitStack) -> dict[str, str]:
    urls = {}
    for name in runtimes:
        runtime, precision = name.split(":")
        log = workdir / f"serve-{runtime}-{precision}-{data_dir.name}.log"
        urls[name] = stack.enter_context(
            server(
                data_dir,
                free_port(),
                log,
                CLIPDEX_RUNTIME=runtime,
                CLIPDEX_PRECISION=precision,
                CLIPDEX_MODEL_CACHE_DIR=str(cache),
            )
        )
    return urls


def measure(urls: dict[str, str], n_queries: int) -> dict[str, Any]:
    clients = {name: httpx.Client(base_url=url, timeout=120) for name, url in urls.items()}
    texts = queries(n_queries + 5, "runtime")
    times: dict[str, list[float]] = {name: [] for name in urls}
    for i, text in enumerate(texts):
        for name, client in clients.items():
            ms = time_http(client, [("/search", {"query": text, "top_k": 10})], warmup=0)
            if i >= 5:
                times[name] += ms
    out = {}
    for name, client in clients.items():
        cached = time_http(client, [("/search", {"query": texts[0], "top_k": 10})] * (n_queries // 2 + 5))
        out[name] = {
            "http_search_text": percentiles(times[name]),
            "http_search_cached": percentiles(cached),
            "memory": memory_mb(SERVER_PIDS[urls[name]]),
        }
        client.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--runtimes", nargs="+", default=RUNTIMES, help="runtime:precision of each server")
    parser.add_argument("--workdir", type=Path, help="keep the store and the exports here")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    print(f"{cpu_model()}, {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="clipdex-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        cache = workdir / "models"
        prepare_exports(cache, args.runtimes)
        data_dir = workdir / f"data-{args.items}"
        prepare_store(data_dir, args.items)
        empty_dir = workdir / "data-empty"
        with ExitStack() as stack:  # the model's memory alone: a server on an empty store
            model_only = measure(serve_all(empty_dir, cache, args.runtimes, workdir, stack), 20)
        print(f"load average at start {os.getloadavg()}", flush=True)
        with ExitStack() as stack:
            results = measure(serve_all(data_dir, cache, args.runtimes, workdir, stack), args.queries)
        print(f"load average at end {os.getloadavg()}")
    base = results[args.runtimes[0]]["http_search_text"]["p50"]
    print(f"\n{args.items:,} items, IVF main, {args.queries} distinct text queries per server, round robin")
    print(
        "| runtime | HTTP text search p50 / p99 | vs first | cached query p50 | encoder (uncached - cached) | "
        "server RSS peak / end | empty store: RSS peak / end |"
    )
    print("| --- | --- | ---: | ---: | ---: | --- | --- |")
    for name, r in results.items():
        text, cached, mem = r["http_search_text"], r["http_search_cached"], r["memory"]
        empty = model_only[name]["memory"]
        print(
            f"| {name} | {text['p50']} / {text['p99']} ms | {base / text['p50']:.2f}x | {cached['p50']} ms | "
            f"{text['p50'] - cached['p50']:.1f} ms | {mem['peak_rss_mb']:.0f} / {mem['rss_mb']:.0f} MB | "
            f"{empty['peak_rss_mb']:.0f} / {empty['rss_mb']:.0f} MB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
