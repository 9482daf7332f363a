"""Fetch, hash, decode and preprocess: the per-image work that runs in the indexer's thread pools.

Each function here runs in a worker thread. Every failure of one image is an `ItemError` that says why
(not found, outside the roots, not an image, truncated, too many pixels, a transient fetch failure), so
the pipeline dead-letters that image and goes on with the others.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from shared.errors import ImageRejected, ItemError
from shared.images import DecodeBudget, decode_image

logger = logging.getLogger(__name__)

Fetch = Callable[[str], bytes]
Preprocess = Callable[[Image.Image], torch.Tensor]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_and_hash(fetch: Fetch, uri: str) -> tuple[bytes, str]:
    data = fetch(uri)
    return data, sha256_of(data)


def decode_and_preprocess(
    data: bytes,
    *,
    max_pixels: int,
    preprocess: Preprocess,
    input_side: int | None = None,
    budget: DecodeBudget | None = None,
) -> torch.Tensor:
    """JPEG/PNG/... bytes to the model's input tensor [3, H, W]; ImageRejected when it is not a whole image.

    input_side: the model's input side; a big image is decoded reduced toward it (a 24 MP JPEG at 1/8
    scale), which the model's own resize would throw away anyway. budget: the process's decode memory."""
    image = decode_image(data, max_pixels=max_pixels, min_side=input_side, budget=budget)
    try:
        return preprocess(image)
    except ItemError:
        raise
    except Exception as exc:  # a decoder error Pillow raises only once pixels are touched
        raise ImageRejected(f"cannot preprocess the image: {type(exc).__name__}: {exc}") from exc


def single_threaded_torch() -> None:
    """Thread initializer: torch ops in this thread run on one core; the model's thread keeps every core.

    The preprocessing ops are tiny. Left at the default, each worker starts its own team of OpenMP threads
    that spin against the model's team: on a 2-core machine under load, ToTensor + Normalize took 27 ms
    instead of 0.4 ms. `torch.set_num_threads(1)` must NOT be used for this: although it reports a
    per-thread value, it also changes process-wide state (MKL, the shared thread pool), and ViT-B-32 in
    the model's thread then ran at half speed for the rest of the process (21 -> 11 images/s, measured
    side by side). The OpenMP runtime's own `omp_set_num_threads` changes only the calling thread.
    """
    for setter in _omp_setters():
        setter(1)


@functools.cache
def _omp_setters() -> tuple[Callable[[int], object], ...]:
    """`omp_set_num_threads` of every OpenMP runtime loaded (libgomp, libiomp, libomp): torch and faiss
    may each bring their own copy, and only torch's matters here, but setting it in each is harmless."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split()[-1] for line in maps if _OPENMP_LIBRARY.search(line)]
    except OSError:  # not Linux: try the loader's own search
        found = ctypes.util.find_library("omp") or ctypes.util.find_library("gomp")
        paths = [found] if found else []
    setters = []
    for path in dict.fromkeys(paths):
        try:
            setters.append(ctypes.CDLL(path).omp_set_num_threads)
        except (OSError, AttributeError):
            continue
    if not setters:
        logger.debug("no OpenMP runtime found; decode threads keep torch's default thread count")
    return tuple(setters)


_OPENMP_LIBRARY = re.compile(r"/lib(g|i)?omp[^/]*\.so")


def decode_pool(workers: int, name: str = "clipdex-decode") -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=single_threaded_torch)
