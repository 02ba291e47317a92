"""Deterministic k-means on the array API (shared by ``routing`` and, e.g., ``clustered`` attention).

Lloyd's algorithm with a fixed number of iterations from explicit initial centroids — no
convergence test, no randomness inside. Conventions:

- ``metric="euclidean"``: assign each point to the centroid with the smallest ‖x − μ‖²;
  ``metric="cosine"`` (spherical k-means): the largest x·μ, centroids re-normalised to unit length
  after each update (the points should be unit vectors).
- Ties go to the lower centroid index (``argmin``/``argmax`` return the first occurrence).
- An empty cluster keeps its previous centroid.
- Batched over leading axes: ``x (..., N, D)``, centroids ``(..., C, D)``.
Distances are exact elementwise differences (memory O(N·C·D)): this is an oracle, not a fast path.
"""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms._numerics import vector_norm

__all__ = ["assign", "kmeans", "initial_centroids", "METRICS"]

METRICS = ("euclidean", "cosine")


def _metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    return metric


def assign(x: Any, centroids: Any, *, metric: str = "euclidean") -> Any:
    """Nearest centroid of each point: int64 ``(..., N)`` (ties → lower index)."""
    xp = namespace(x, centroids)
    if _metric(metric) == "cosine":
        return xp.astype(xp.argmax(x @ xp.matrix_transpose(centroids), axis=-1), xp.int64)
    diff = xp.expand_dims(x, axis=-2) - xp.expand_dims(centroids, axis=-3)  # (..., N, C, D)
    # Squared distances overflow from |x| ≈ 1e154 (every point would go to cluster 0); one positive
    # scale per point leaves its argmin unchanged, so divide by the point's largest |difference|.
    top = xp.max(xp.abs(diff), axis=(-2, -1), keepdims=True)
    diff = diff / xp.where((top == 0) | ~xp.isfinite(top), 1.0, top)
    return xp.astype(xp.argmin(xp.sum(diff * diff, axis=-1), axis=-1), xp.int64)


def initial_centroids(x: Any, count: int, *, seed: Any) -> Any:
    """``count`` distinct points of ``x (..., N, D)`` per leading index, drawn with :mod:`reflex.random`."""
    xp = namespace(x)
    n = int(x.shape[-2])
    if count > n:
        raise ValueError(f"cannot pick {count} initial centroids from {n} points")
    picks = random.choice(tuple(int(s) for s in x.shape[:-2]), seed=seed, population=n, count=count, sort=False,
                          xp=xp, device=device_of(x))
    idx = xp.broadcast_to(xp.expand_dims(picks, axis=-1), (*picks.shape, int(x.shape[-1])))
    return xp.take_along_axis(x, idx, axis=-2)


def kmeans(x: Any, /, *, init: Any, iterations: int, metric: str = "euclidean") -> Any:
    """``iterations`` Lloyd steps from ``init (..., C, D)`` on ``x (..., N, D)`` → centroids ``(..., C, D)``."""
    xp = namespace(x, init)
    _metric(metric)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0; got {iterations!r}")
    clusters = xp.arange(int(init.shape[-2]), dtype=xp.int64, device=device_of(x))
    centroids = init
    for _ in range(iterations):
        onehot = xp.astype(xp.expand_dims(assign(x, centroids, metric=metric), axis=-1) == clusters, x.dtype)  # (..., N, C)
        sums = xp.matrix_transpose(onehot) @ x
        counts = xp.expand_dims(xp.sum(onehot, axis=-2), axis=-1)
        updated = sums / xp.where(counts > 0, counts, 1.0)
        if metric == "cosine":
            norm = vector_norm(xp, updated)
            updated = updated / xp.where(norm > 0, norm, 1.0)
        centroids = xp.where(counts > 0, updated, centroids)
    return centroids
