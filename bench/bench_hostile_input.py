"""What hostile input costs: time and peak Python memory of parsing poison events and of a huge text query,
each beside a normal one measured in the same run (the ratio is the figure that survives machine load).

- Events: `parse_event` on a normal event, then on each poison case of issue 9 and the worst cases of the
  new guards, at the largest event allowed (256 KiB): `[]` pairs, which the nesting scan must read to the
  end and json.loads must build; brackets inside a string; and a message over the size limit. The outcome
  is the reason's first words, or the exception that escaped.
- Queries: `SearchService.search_text` with the tiny model on an empty index, a short query vs a 1 MB one
  (run against main, the whole 1 MB was tokenised and became a query-cache key).

Peak memory is tracemalloc's (Python allocations; the tokenizer and json are Python or use its allocator).

    python -m bench.bench_hostile_input          # from a checkout, PYTHONPATH=.

Not part of the test run.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from indexer.events import MAX_EVENT_BYTES, parse_event
from shared.embedder import Embedder, ModelSpec

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs"
MIB = 1024 * 1024


def events() -> dict[str, bytes]:
    normal = {"op": "upsert", "id": "sku-1", "uri": "/images/a.jpg", "metadata": {"title": "a red shoe", "n": 3}}
    return {
        "normal event": json.dumps(normal).encode(),
        "100,000 nested arrays": b"[" * 100_000 + b"]" * 100_000,
        "metadata of 100,000 nested arrays": (
            b'{"op": "upsert", "id": "a", "uri": "a.jpg", "metadata": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
        ),
        "a 5,000-digit number": b'{"op": "upsert", "id": "a", "uri": "a.jpg", "metadata": {"n": ' + b"9" * 5000 + b"}}",
        "version 10^30": json.dumps({**normal, "version": 10**30}).encode(),
        "uri http://[::1/x.jpg": json.dumps({**normal, "uri": "http://[::1/x.jpg"}).encode(),
        "256 KiB of [] pairs": b'{"op": "delete", "id": "a", "x": [' + b"[]," * (MAX_EVENT_BYTES // 3 - 20) + b"[]]}",
        "256 KiB of brackets in a string": json.dumps(
            {**normal, "metadata": {"s": "[{" * (MAX_EVENT_BYTES // 2 - 100)}}
        ).encode(),
        "1 MiB (over the limit)": b"[" * MIB,
    }


def measure(fn: Callable[[], Any], repeat: int) -> tuple[float, int, str]:
    """p50 seconds, peak bytes (of one call), and the outcome."""
    outcome = "ok"
    times = []
    for i in range(repeat):
        if i == 0:
            tracemalloc.start()
        started = time.perf_counter()
        try:
            fn()
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {str(exc)[:70]}"
        times.append(time.perf_counter() - started)
        if i == 0:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    return statistics.median(times[1:] or times), peak, outcome


def main() -> None:
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"{platform.processor() or platform.machine()}, load {load}")
    print("| input | p50 | peak memory | outcome |\n| --- | --- | --- | --- |")
    for name, value in events().items():
        seconds, peak, outcome = measure(lambda value=value: parse_event(value), repeat=7)
        print(f"| {name} ({len(value):,} B) | {seconds * 1000:.2f} ms | {peak / MIB:.2f} MiB | {outcome} |")

    from shared.search import SearchService
    from shared.sqlite.index import IndexParams, LiveIndex
    from shared.sqlite.search import IndexSearch
    from shared.sqlite.store import SqliteStore

    embedder = Embedder(ModelSpec("clipdex-tiny", None, CONFIGS, "cpu", "fp32", query_cache_size=0))
    embedder.load()
    with tempfile.TemporaryDirectory() as tmp, SqliteStore(Path(tmp) / "db.sqlite3") as store:
        store.bind_model(embedder.identity)
        params = IndexParams("flat", 10**6, None, None, 16, 64, 10**6, 1e9)
        index = LiveIndex(store, embedder.identity.dim, params, Path(tmp) / "index")
        index.refresh()
        search = SearchService(IndexSearch(store, index), store, embedder)
        huge = "a red bicycle on a beach " * (MIB // 25)
        cases: dict[str, Callable[[], Any]] = {
            "query of 24 characters": lambda: search.search_text("a red bicycle on a beach"),
            f"query of {len(huge):,} characters (capped)": lambda: search.search_text(huge),
            "the same query, uncapped (as on main): encode_text": lambda: embedder.encode_text(huge),
        }
        for name, fn in cases.items():
            seconds, peak, outcome = measure(fn, repeat=3 if "uncapped" in name else 11)
            print(f"| {name} | {seconds * 1000:.1f} ms | {peak / MIB:.2f} MiB | {outcome} |")
    embedder.close()


if __name__ == "__main__":
    main()
