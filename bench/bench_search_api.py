"""Latency of the read side: text search and find_similar by id, over HTTP and over MCP (streamable HTTP).

A store is filled with N synthetic unit vectors bound to ViT-B-32 (random weights: the same cost as trained
ones, no download), compacted into a main index, and served by a real `clipdex serve` process; this
process is the client and sends one request at a time. Text queries are all distinct, so every one pays
for the text encoder (a repeated query is answered from the embedder's cache; measured separately).
Then the main index is rebuilt as IVF and the same requests are measured again.

    python bench/bench_search_api.py --quick               # 20k items, a minute or two
    python bench/bench_search_api.py --sizes 100000 1000000

Prints a table (and JSON with --out). Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from mcp import Client

from indexer.compaction import compact
from shared.config import Settings, load_settings
from shared.embedder import Embedder
from shared.roles import Upsert
from shared.sqlite.index import IndexParams, LiveIndex
from shared.sqlite.store import SqliteStore

ADJECTIVES = ["red", "small", "old", "shiny", "wooden", "striped", "broken", "tall", "blue", "quiet", "empty", "wet"]
NOUNS = ["bicycle", "lighthouse", "teapot", "dog", "mountain", "invoice", "sneaker", "kitchen", "bridge", "cat"]
PLACES = ["on a beach", "at night", "in the snow", "on a table", "in a city", "under a tree", "in the rain"]


def queries(n: int, salt: str) -> list[str]:
    out = []
    for i in range(n):
        a, b = ADJECTIVES[i % len(ADJECTIVES)], ADJECTIVES[(i // 3) % len(ADJECTIVES)]
        noun, place = NOUNS[(i // 7) % len(NOUNS)], PLACES[i % len(PLACES)]
        out.append(f"a {a} {b} {noun} {place}, photo {salt}{i}")
    return out


def percentiles(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 2), "p99": round(p99, 2), "n": len(ordered)}


def bench_settings(data_dir: Path, **overrides: Any) -> Settings:
    return load_settings(
        data_dir=data_dir, model="ViT-B-32", pretrained="none", device="cpu", log_level="WARNING", **overrides
    )


# -- filling the store ------------------------------------------------------------------------------------


def fill(store: SqliteStore, n: int, dim: int, batch: int = 20_000) -> float:
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    for start in range(0, n, batch):
        count = min(batch, n - start)
        vecs = rng.standard_normal((count, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        store.apply(
            upserts=[
                Upsert(
                    id=f"kafka:item-{start + j}",
                    source="kafka",
                    uri=f"https://img.example.com/{start + j}.jpg",
                    sha256=hashlib.sha256(str(start + j).encode()).hexdigest(),
                    metadata={"category": (start + j) % 10},
                    embedding=vecs[j],
                )
                for j in range(count)
            ]
        )
    return time.perf_counter() - started


# -- the server -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SERVER_PIDS: dict[str, int] = {}  # url -> pid of each running server, for memory figures


@contextmanager
def server(data_dir: Path, port: int, log: Path, **settings: str) -> Iterator[str]:
    """A `clipdex serve` process on ViT-B-32 (random weights); `settings` are extra CLIPDEX_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPDEX_")}
    env.update(
        CLIPDEX_DATA_DIR=str(data_dir),
        CLIPDEX_MODEL="ViT-B-32",
        CLIPDEX_PRETRAINED="none",
        CLIPDEX_DEVICE="cpu",
        CLIPDEX_LOG_LEVEL="WARNING",
        HF_HUB_OFFLINE="1",
    )
    # `python -m clipdex`: the code on PYTHONPATH, whichever clipdex the environment's script was installed from
    env.update(settings)
    command = [sys.executable, "-m", "clipdex", "serve", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"clipdex serve exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("clipdex serve did not start")
            time.sleep(0.2)
        SERVER_PIDS[url] = proc.pid
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_generation(url: str, generation: int) -> None:
    deadline = time.monotonic() + 600
    while httpx.get(f"{url}/health", timeout=10).json()["generation"] < generation:
        if time.monotonic() > deadline:
            raise SystemExit(f"the server never loaded generation {generation}")
        time.sleep(0.2)


# -- measuring --------------------------------------------------------------------------------------------


def time_http(client: httpx.Client, requests: list[tuple[str, dict[str, Any]]], warmup: int = 5) -> list[float]:
    for path, params in requests[:warmup]:
        client.get(path, params=params).raise_for_status()
    out = []
    for path, params in requests[warmup:]:
        started = time.perf_counter()
        response = client.get(path, params=params)
        out.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return out


async def time_mcp(url: str, calls: list[tuple[str, dict[str, Any]]], warmup: int = 5) -> list[float]:
    out = []
    async with Client(f"{url}/mcp") as client:
        for i, (tool, arguments) in enumerate(calls):
            started = time.perf_counter()
            result = await client.call_tool(tool, arguments)
            elapsed = (time.perf_counter() - started) * 1000
            if result.is_error:
                raise SystemExit(f"MCP {tool} failed: {result.content}")
            if i >= warmup:
                out.append(elapsed)
    return out


def time_calls(fn: Callable[[int], Any], n: int, warmup: int = 3) -> list[float]:
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(n):
        started = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - started) * 1000)
    return out


def breakdown(settings: Settings, dim: int, vectors: list[np.ndarray]) -> dict[str, Any]:
    """Where a search's time goes after the text encoder, in process: FAISS top-10 and the item lookup.
    (The encoder's share is the served uncached minus cached text search: measured in the server.)"""
    with SqliteStore(settings.db_path) as store:
        index = LiveIndex(store, dim, IndexParams.from_settings(settings), settings.index_dir)
        index.refresh()
        faiss_ms = time_calls(lambda i: index.search(vectors[i % len(vectors)], 10), 200)
        found = [[vid for vid, _ in index.search(v, 10)] for v in vectors]
        lookup_ms = time_calls(lambda i: store.items_for_vectors(found[i % len(found)]), 200)
    return {"faiss_search_ms": percentiles(faiss_ms), "item_lookup_ms": percentiles(lookup_ms)}


def measure(url: str, n: int, n_queries: int, salt: str) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    ids = [f"kafka:item-{i}" for i in rng.integers(0, n, n_queries + 5)]
    texts = queries(n_queries + 5, salt)
    with httpx.Client(base_url=url, timeout=60) as client:
        http_text = time_http(client, [("/search", {"query": q, "top_k": 10}) for q in texts])
        http_cached = time_http(client, [("/search", {"query": texts[0], "top_k": 10})] * (n_queries + 5))
        http_similar = time_http(client, [("/similar", {"id": i, "top_k": 10}) for i in ids])
    mcp_texts = queries(n_queries + 5, salt + "mcp")
    mcp_text = asyncio.run(time_mcp(url, [("search", {"query": q, "top_k": 10}) for q in mcp_texts]))
    mcp_similar = asyncio.run(time_mcp(url, [("find_similar", {"item_id": i, "top_k": 10}) for i in ids]))
    return {
        "http_search_text": percentiles(http_text),
        "http_search_text_cached": percentiles(http_cached),
        "http_similar_by_id": percentiles(http_similar),
        "mcp_search_text": percentiles(mcp_text),
        "mcp_find_similar_by_id": percentiles(mcp_similar),
    }


def run_size(n: int, n_queries: int, workdir: Path) -> dict[str, Any]:
    data_dir = workdir / f"data-{n}"
    settings = bench_settings(data_dir, index_kind="flat")
    embedder = Embedder.from_settings(settings)
    dim = embedder.identity.dim
    result: dict[str, Any] = {"items": n}
    with SqliteStore(settings.db_path) as store:
        store.bind_model(embedder.identity)
        result["fill_s"] = round(fill(store, n, dim), 1)
        flat = compact(store, IndexParams.from_settings(settings), dim, settings.index_dir)
        result["compact_flat_s"] = round(flat.seconds, 1)
    log = workdir / f"server-{n}.log"
    vectors = [embedder.encode_text(t).vector for t in queries(50, "breakdown")]
    embedder.close()
    result["flat"] = {"breakdown": breakdown(settings, dim, vectors)}
    with server(data_dir, free_port(), log) as url:
        result["flat"].update(measure(url, n, n_queries, "flat"))
        print(f"  {n:,} items, flat main: {json.dumps(result['flat'])}", flush=True)
        ivf_settings = bench_settings(data_dir, index_kind="ivf")
        with SqliteStore(settings.db_path) as store:
            ivf = compact(store, IndexParams.from_settings(ivf_settings), dim, settings.index_dir)
        result["compact_ivf_s"] = round(ivf.seconds, 1)
        wait_generation(url, ivf.generation)
        params = IndexParams.from_settings(ivf_settings)
        nlist = params.nlist(n)
        result["ivf"] = {"nlist": nlist, "nprobe": params.nprobe(nlist), **measure(url, n, n_queries, "ivf")}
        result["ivf"]["breakdown"] = breakdown(ivf_settings, dim, vectors)
        print(f"  {n:,} items, IVF main: {json.dumps(result['ivf'])}", flush=True)
    return result


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| items | main index | HTTP search (text) p50 / p99 | MCP search (text) p50 / p99 | HTTP similar by id "
        "p50 / p99 | MCP find_similar by id p50 / p99 | HTTP search, cached query p50 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for kind in ("flat", "ivf"):
            m = r[kind]
            label = "flat" if kind == "flat" else f"IVF (nlist {m['nlist']}, nprobe {m['nprobe']})"

            def pp(key: str, m: dict[str, Any] = m) -> str:
                return f"{m[key]['p50']} / {m[key]['p99']} ms"

            rows.append(
                f"| {r['items']:,} | {label} | {pp('http_search_text')} | {pp('mcp_search_text')} | "
                f"{pp('http_similar_by_id')} | {pp('mcp_find_similar_by_id')} | "
                f"{m['http_search_text_cached']['p50']} ms |"
            )
    rows += [
        "",
        "| items | main index | text encoder (uncached − cached) p50 | FAISS top-10 p50 | item lookup p50 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for kind in ("flat", "ivf"):
            m = r[kind]
            encoder = m["http_search_text"]["p50"] - m["http_search_text_cached"]["p50"]
            b = m["breakdown"]
            rows.append(
                f"| {r['items']:,} | {kind} | {encoder:.1f} ms | {b['faiss_search_ms']['p50']} ms | "
                f"{b['item_lookup_ms']['p50']} ms |"
            )
    return "\n".join(rows)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k items, 50 queries")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="collection sizes")
    parser.add_argument("--queries", type=int, default=200, help="timed requests per measurement")
    parser.add_argument("--workdir", type=Path, help="keep the stores here (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ["HF_HUB_OFFLINE"] = "1"
    sizes, n_queries = ([20_000], 50) if args.quick else (args.sizes, args.queries)
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_before": [round(v, 1) for v in os.getloadavg()],
    }
    print(f"machine: {machine}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="clipdex-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for n in sizes:
            print(f"{n:,} items ...", flush=True)
            results.append(run_size(n, n_queries, workdir))
    machine["load_average_after"] = [round(v, 1) for v in os.getloadavg()]
    print(f"load average before {machine['load_average_before']}, after {machine['load_average_after']}")
    print(table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
