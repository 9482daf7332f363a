"""Synthetic embeddings for the core benchmarks (not part of the test run). Two kinds, both normalised:

- `faiss_synthetic`: faiss's own SyntheticDataset (faiss.contrib.datasets), generated in chunks so 1M x 512
  fits in memory: a 10-dimensional manifold bent into 512 dimensions by sines. The harder of the two for
  IVF; the defaults are tuned on it.
- `clip_like`: a Gaussian mixture on the unit sphere, shaped like CLIP image embeddings rather than uniform noise
(uniform random vectors in 512-d have no neighbours, which makes every ANN index look bad): a direction
shared by all vectors, 2000 clusters of log-normal sizes, a rank-16 spread inside each cluster, and a
little isotropic noise. At 100k vectors a random pair has cosine ~0.52, the nearest neighbour ~0.89 and
the 10th ~0.84, which is how trained CLIP ViT-B-32 embeddings of a photo collection behave.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def clip_like(
    n: int,
    dim: int = 512,
    *,
    seed: int = 0,
    clusters: int = 2000,
    rank: int = 16,
    chunk: int = 100_000,
) -> NDArray[np.float32]:
    """`n` unit vectors; the same seed gives the same mixture, so base and queries share clusters."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(dim).astype(np.float32)
    common /= np.linalg.norm(common)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    bases = rng.standard_normal((clusters, rank, dim)).astype(np.float32) / np.sqrt(dim)
    weights = rng.lognormal(0.0, 1.0, clusters)
    weights /= weights.sum()
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        labels = np.sort(rng.choice(clusters, size=m, p=weights))
        z = rng.standard_normal((m, rank)).astype(np.float32) / np.sqrt(rank)
        x = 0.7 * common + 0.5 * centers[labels]
        bounds = np.searchsorted(labels, np.arange(clusters + 1))
        for k in range(clusters):
            lo, hi = bounds[k], bounds[k + 1]
            if hi > lo:
                x[lo:hi] += 0.4 * (z[lo:hi] @ bases[k])
        x += rng.standard_normal((m, dim)).astype(np.float32) * (0.2 / np.sqrt(dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x[rng.permutation(m)]
    return out


def faiss_synthetic(n: int, dim: int = 512, *, seed: int = 1338, chunk: int = 100_000) -> NDArray[np.float32]:
    """faiss.contrib.datasets.SyntheticDataset(dim, 0, n, 0, seed=seed).xb, normalised, without its
    n x dim float64 temporaries (the same random draws, in the same order)."""
    rs = np.random.RandomState(seed)
    low = rs.normal(size=(n, 10))
    projection = rs.rand(10, dim)
    scale = rs.rand(dim) * 4 + 0.1
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        x = np.sin(np.dot(low[start : start + chunk], projection) * scale).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + len(x)] = x
    return out


DATASETS = {"faiss-synthetic": faiss_synthetic, "clip-like": clip_like}


def base_and_queries(
    n: int, nq: int, dim: int = 512, dataset: str = "faiss-synthetic"
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """n base vectors and nq queries from the same distribution (the queries are not in the base)."""
    data = DATASETS[dataset](n + nq, dim)
    return np.ascontiguousarray(data[:n]), np.ascontiguousarray(data[n:])
