"""ONNX Runtime against torch on this CPU, in one run: text queries one at a time, image batches, parity.

ViT-B-32 with random weights (the same cost as trained ones; nothing is downloaded). The three embedders
(torch fp32, ONNX fp32, ONNX int8) are loaded side by side; text queries alternate between them query by
query, so all see the same machine load. `--busy N` starts N processes that spin on a core for the whole
run, to measure a machine whose cores are taken (the shared CI and dev machines often are).

    python -m bench.bench_onnx --quick                 # 30 queries, small image batches
    python -m bench.bench_onnx                         # 200 queries, batches of 64 and 6
    python -m bench.bench_onnx --busy 2                # the same with both cores taken
    python -m bench.bench_onnx --text-threads 1 2      # the text session on 1 and on 2 threads

The first run exports the model (about a minute); later runs reuse the cache (--cache-dir).
Not part of the test run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.bench_text_encoding import queries
from shared.embedder import Embedder, ModelSpec
from shared.onnx_towers import OnnxTowers


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy(n: int) -> Iterator[None]:
    procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
            p.join()


def p50(xs: list[float]) -> float:
    return float(np.percentile(xs, 50) * 1e3)


def p90(xs: list[float]) -> float:
    return float(np.percentile(xs, 90) * 1e3)


class Worker:
    """One runtime in its own process: no thread pool of one runtime spins on a core another is timing."""

    def __init__(self, name: str, spec: ModelSpec, text_threads: int | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, spec, text_threads), daemon=True)
        self._proc.start()

    def call(self, *request: object) -> Any:
        self._conn.send(request)
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(30)


def _serve(conn: Any, spec: ModelSpec, text_threads: int | None) -> None:
    embedder = Embedder(spec)
    embedder.load()
    if text_threads is not None and embedder._onnx is not None:
        embedder._onnx = OnnxTowers(embedder._onnx.paths, text_threads=text_threads)
    conn.send(embedder.image_size)
    while (request := conn.recv()) is not None:
        kind, *rest = request
        if kind == "text":
            start = time.perf_counter()
            embedder.encode_texts(rest[0])
            conn.send(time.perf_counter() - start)
        elif kind == "vectors":
            texts, pixels = rest
            conn.send((np.stack([t.vector for t in embedder.encode_texts(texts)]), embedder.encode_images(pixels)))
        elif kind == "images":
            pixels = rest[0]
            embedder.encode_images(pixels[:4])
            start = time.perf_counter()
            embedder.encode_images(pixels)
            conn.send(len(pixels) / (time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--cache-dir", type=Path, default=None, help="CLIPDEX_MODEL_CACHE_DIR")
    parser.add_argument("--busy", type=int, default=0, help="spinning processes during the measurements")
    parser.add_argument("--text-threads", type=int, nargs="+", default=[1], help="ONNX text session threads")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 6], help="image batch sizes")
    args = parser.parse_args()
    if args.quick:
        args.queries, args.batches = 30, [16, 6]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")

    def spec(runtime: str, precision: str) -> ModelSpec:
        return ModelSpec(args.model, None, None, "cpu", precision, args.cache_dir, 0, runtime)

    workers = [Worker("torch fp32", spec("torch", "fp32"), None)]
    for threads in args.text_threads:
        suffix = f", {threads} text threads" if len(args.text_threads) > 1 else ""
        workers.append(Worker(f"onnx fp32{suffix}", spec("onnx", "fp32"), threads))
        workers.append(Worker(f"onnx int8{suffix}", spec("onnx", "int8"), threads))
    sizes = {w.name: w._conn.recv() for w in workers}  # each worker says it is loaded
    image_size = sizes["torch fp32"]
    print(f"load average before {os.getloadavg()}")
    try:
        with busy(args.busy):
            time.sleep(1 if args.busy else 0)
            print(f"busy processes {args.busy}; load average at start {os.getloadavg()}")
            parity(workers, image_size)
            text(workers, args.queries)
            micro_batches(workers, args.queries)
            images(workers, args.batches, image_size)
            print(f"\nload average at end {os.getloadavg()}")
    finally:
        for w in workers:
            w.close()


def parity(workers: list[Worker], image_size: tuple[int, int]) -> None:
    texts = ["a", "a photo of a cat", " ".join(["word"] * 30), " ".join(["long"] * 100)]
    pixels = torch.randn(8, 3, *image_size)
    want_t, want_i = workers[0].call("vectors", texts, pixels)
    print("\n| runtime | text max abs diff | text min cosine | image max abs diff | image min cosine |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for w in workers[1:]:
        got_t, got_i = w.call("vectors", texts, pixels)
        print(
            f"| {w.name} | {np.abs(got_t - want_t).max():.1e} | {(got_t * want_t).sum(1).min():.4f} | "
            f"{np.abs(got_i - want_i).max():.1e} | {(got_i * want_i).sum(1).min():.4f} |"
        )


def text(workers: list[Worker], n: int) -> None:
    texts = queries(n)
    for w in workers:  # warm up
        for q in texts[:5]:
            w.call("text", [q])
    times: dict[str, list[float]] = {w.name: [] for w in workers}
    for q in texts:
        for w in workers:
            times[w.name].append(w.call("text", [q]))
    base = p50(times["torch fp32"])
    print(f"\nText query, one at a time ({len(texts)} distinct queries, Embedder.encode_texts)")
    print("| runtime | p50 ms | p90 ms | speed-up vs torch (p50) |")
    print("| --- | ---: | ---: | ---: |")
    for name, xs in times.items():
        print(f"| {name} | {p50(xs):.1f} | {p90(xs):.1f} | {base / p50(xs):.2f}x |")


def micro_batches(workers: list[Worker], n: int) -> None:
    """Would batching two concurrent queries into one call help? One call of 2 vs two calls of 1."""
    worker = next(w for w in workers if w.name.startswith("onnx int8"))
    texts = queries(n)
    single, double = [], []
    for a, b in zip(texts[::2], texts[1::2], strict=False):
        single.append(worker.call("text", [a]) + worker.call("text", [b]))
        double.append(worker.call("text", [a, b]))
    print(
        f"\nMicro-batching ({worker.name}): two queries one after the other p50 {p50(single):.1f} ms, "
        f"the same two in one call p50 {p50(double):.1f} ms"
    )


def images(workers: list[Worker], batches: list[int], image_size: tuple[int, int]) -> None:
    print("\nImage batches (preprocessed tensors, Embedder.encode_images; median of rounds)")
    print("| batch | runtime | images/s | vs torch |")
    print("| ---: | --- | ---: | ---: |")
    for size in batches:
        pixels = torch.randn(size, 3, *image_size)
        rates: dict[str, list[float]] = {w.name: [] for w in workers}
        for _ in range(max(2, 128 // size)):
            for w in workers:
                rates[w.name].append(w.call("images", pixels))
        base = float(np.median(rates["torch fp32"]))
        for name, xs in rates.items():
            rate = float(np.median(xs))
            print(f"| {size} | {name} | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
