"""What the store's safety costs (issue 9, store side), against the store without it, in one run.

1. Loading a main index: `read_main` with its sha256 checked first, vs FAISS's read alone, on a flat
   main of N 512-d vectors (the file a search process loads at start and after every compaction).
2. Writing a micro-batch: `SqliteStore.apply` of 64 upserts (new vectors) on this tree's store (versions
   checked inside the transaction, older dead letters' retries ended) vs the baseline tree's store
   (`--baseline-tree DIR`, e.g. `git archive main | tar -x -C DIR`), each on a store that already holds
   N/10 items and 5,000 dead letters waiting for a retry. Rounds alternate between the two.

    python bench/bench_store_safety.py --quick --baseline-tree /tmp/main-tree   # 20k vectors
    python bench/bench_store_safety.py --baseline-tree /tmp/main-tree           # 200k vectors

Not part of the test run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import faiss
import numpy as np

from shared.roles import Failure, Upsert
from shared.sqlite.index import main_path, read_main, write_main
from shared.sqlite.store import SqliteStore

DIM = 512


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def load_times(n: int, work: Path, rounds: int) -> dict[str, float]:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    index.add_with_ids(unit(np.random.default_rng(0), n), np.arange(1, n + 1, dtype=np.int64))
    checksum = write_main(index, work, 1)
    plain, checked = [], []
    for _ in range(rounds):  # alternate, so both see the same page cache and load
        started = time.perf_counter()
        faiss.read_index(str(main_path(work, 1)))
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        read_main(work, 1, checksum)
        checked.append(time.perf_counter() - started)
    size = main_path(work, 1).stat().st_size
    return {
        "file_mb": size / 2**20,
        "read_s": statistics.median(plain),
        "read_checked_s": statistics.median(checked),
        "ratio": statistics.median(checked) / statistics.median(plain),
    }


def baseline_store(tree: Path) -> ModuleType:
    """The baseline tree's store module, imported beside this tree's (it shares this tree's roles)."""
    spec = importlib.util.spec_from_file_location("baseline_store", tree / "shared" / "sqlite" / "store.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seeded(cls: Any, path: Path, items: int, letters: int, retriable: bool) -> Any:
    store = cls(path)
    rng = np.random.default_rng(1)
    for lo in range(0, items, 1000):
        vecs = unit(rng, min(1000, items - lo))
        store.apply(
            upserts=[
                Upsert(f"kafka:seed-{lo + i}", "kafka", f"https://x/{lo + i}", f"s{lo + i}", {"k": 1}, v)
                for i, v in enumerate(vecs)
            ]
        )
    extra: dict[str, Any] = {"retriable": True, "retry_at": datetime.now(UTC) + timedelta(hours=1)} if retriable else {}
    store.apply(failures=[Failure("kafka", "{}", "FetchFailed", id=f"kafka:down-{i}", **extra) for i in range(letters)])
    return store


def apply_times(n: int, work: Path, tree: Path, rounds: int) -> dict[str, float]:
    old = baseline_store(tree).SqliteStore
    stores = {
        "baseline": seeded(old, work / "old.sqlite3", n // 10, 5000, retriable=False),
        "this": seeded(SqliteStore, work / "new.sqlite3", n // 10, 5000, retriable=True),
    }
    rng = np.random.default_rng(2)
    times: dict[str, list[float]] = {name: [] for name in stores}
    for r in range(rounds):
        vecs = unit(rng, 64)
        for name, store in stores.items():
            batch = [
                Upsert(f"kafka:b{r}-{i}", "kafka", f"https://x/b{r}-{i}", f"b{r}-{i}", {"k": 2}, v, version=r)
                for i, v in enumerate(vecs)
            ]
            started = time.perf_counter()
            store.apply(upserts=batch)
            times[name].append(time.perf_counter() - started)
    for store in stores.values():
        store.close()
    base, this = statistics.median(times["baseline"]), statistics.median(times["this"])
    return {"baseline_ms": base * 1000, "this_ms": this * 1000, "ratio": this / base}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k vectors, fewer rounds")
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--baseline-tree", type=Path, required=True, help="a checkout of the baseline (main)")
    args = parser.parse_args(argv)
    n = 20_000 if args.quick else args.vectors
    rounds = 5 if args.quick else 9
    with tempfile.TemporaryDirectory(prefix="clipdex-bench-safety-") as tmp:
        work = Path(tmp)
        load = load_times(n, work / "index", rounds)
        write = apply_times(n, work, args.baseline_tree, rounds * 4)
    result = {"vectors": n, "load": load, "apply_64": write}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()}")
    print(
        f"main index load, {n} vectors ({load['file_mb']:.0f} MB): FAISS read {load['read_s'] * 1000:.0f} ms, "
        f"sha256 checked then read {load['read_checked_s'] * 1000:.0f} ms (x{load['ratio']:.2f})"
    )
    print(
        f"apply 64 upserts ({n // 10} items, 5000 dead letters stored): baseline {write['baseline_ms']:.1f} ms, "
        f"this tree {write['this_ms']:.1f} ms (x{write['ratio']:.2f})"
    )
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
