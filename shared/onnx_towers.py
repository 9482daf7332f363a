"""The two towers on ONNX Runtime: an image session for the indexer's batches, a text session for queries.

    pixels [n, 3, H, W] float32 ─▶ image session (every core)        ─▶ features [n, dim]
    tokens [n, L] int64         ─▶ text session (QUERY_THREADS cores) ─▶ features [n, dim]

ONNX Runtime sessions are safe to run from several threads at once, so the server's concurrent queries
each run on their own thread without a lock.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared.errors import ModelExportError
from shared.onnx_export import Tower

QUERY_THREADS = 1
"""Intra-op threads of the text session: a search encodes one query at a time. Measured on 2 cores with
ViT-B-32 (bench/bench_onnx.py, bench/RESULTS.md "ONNX Runtime"), p50 of one query on 1 vs 2 threads:
int8 9.6 vs 9.3 ms idle, 15.7 vs 22.9 ms at load ~3, 24.9 vs 36.8 ms with both cores taken; fp32 18.9 vs
11.3 ms idle, 24.6 vs 17.9 ms at load ~3, 48.0 vs 60.8 ms busy. int8 never gains from a second thread;
fp32 does only on an idle machine and loses when busy. One thread also leaves the other cores to
concurrent queries, which run side by side (batching two concurrent queries into one call was slower
than running them one after the other: 37 vs 33 ms)."""


def cpu_count() -> int:
    """Cores this process may run on (a container's CPU set, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def session_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its C++ notes on the graph go to stderr otherwise
    return options


class OnnxTowers:
    def __init__(
        self, paths: dict[Tower, Path], *, image_threads: int | None = None, text_threads: int = QUERY_THREADS
    ) -> None:
        import onnxruntime as ort

        self.paths = paths
        self.image_threads = image_threads or cpu_count()
        self.text_threads = text_threads
        try:
            self._image = ort.InferenceSession(
                str(paths["image"]), session_options(self.image_threads), providers=["CPUExecutionProvider"]
            )
            self._text = ort.InferenceSession(
                str(paths["text"]), session_options(self.text_threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's own errors (InvalidGraph, Fail) share no base class
            raise ModelExportError(f"ONNX Runtime cannot load the exported towers: {exc}") from exc

    def encode_images(self, pixels: NDArray[np.float32]) -> NDArray[np.float32]:
        out = self._image.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def encode_tokens(self, tokens: NDArray[np.int64]) -> NDArray[np.float32]:
        out = self._text.run(None, {"tokens": np.ascontiguousarray(tokens, dtype=np.int64)})[0]
        return np.asarray(out, dtype=np.float32)
