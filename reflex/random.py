"""Deterministic random draws: host-side NumPy PCG64 from an explicit integer seed.

reflex never draws from global random state. A mechanism that needs random numbers (Performer
projections, LSH rotations, BigBird plans, k-means initialisation, test inputs) takes them as an
explicit array, or takes an integer ``seed`` and expands it here. Draws happen on the host with
``numpy.random.Generator(PCG64(SeedSequence(seed)))`` and are then moved to the caller's namespace
and device, so NumPy, CuPy, torch and array-api-strict all see bit-identical numbers.

A ``seed`` is an int ``>= 0`` or a tuple of them; tuples name independent streams, e.g.
``(seed, 1)`` and ``(seed, 2)`` for two arrays that must not be correlated.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy

from reflex.backends import from_numpy

__all__ = ["generator", "normal", "uniform", "integers", "choice", "orthogonal", "Seed"]

Seed = int | tuple[int, ...]


def generator(seed: Seed) -> numpy.random.Generator:
    """A fresh PCG64 generator for ``seed`` (validated: non-negative int or tuple of them)."""
    parts = seed if isinstance(seed, tuple) else (seed,)
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, numpy.integer)) or part < 0:
            raise TypeError(f"seed must be a non-negative int or a tuple of them; got {seed!r}")
    return numpy.random.Generator(numpy.random.PCG64(numpy.random.SeedSequence([int(p) for p in parts])))


def _place(host: numpy.ndarray, xp: ModuleType | None, device: Any) -> Any:
    return host if xp is None else from_numpy(host, xp, device)


def normal(shape: tuple[int, ...], *, seed: Seed, xp: ModuleType | None = None, device: Any = None,
           loc: float = 0.0, std: float = 1.0) -> Any:
    """Standard-normal float64 draws of ``shape`` (host NumPy when ``xp`` is None)."""
    host = generator(seed).normal(loc, std, size=shape)
    return _place(host, xp, device)


def uniform(shape: tuple[int, ...], *, seed: Seed, xp: ModuleType | None = None, device: Any = None,
            low: float = 0.0, high: float = 1.0) -> Any:
    """Uniform float64 draws in [low, high)."""
    host = generator(seed).uniform(low, high, size=shape)
    return _place(host, xp, device)


def integers(shape: tuple[int, ...], *, seed: Seed, low: int, high: int, xp: ModuleType | None = None,
             device: Any = None) -> Any:
    """Uniform int64 draws in [low, high)."""
    host = generator(seed).integers(low, high, size=shape, dtype=numpy.int64)
    return _place(host, xp, device)


def choice(shape: tuple[int, ...], *, seed: Seed, population: int, count: int, sort: bool = True,
           xp: ModuleType | None = None, device: Any = None) -> Any:
    """For each index of ``shape``, ``count`` distinct integers from ``range(population)``.

    Returns int64 of shape ``shape + (count,)``; each row sorted ascending when ``sort``. Rows are
    drawn one after another from one generator (row-major order), so the result is reproducible.
    """
    if count > population:
        raise ValueError(f"count ({count}) exceeds population ({population}): cannot draw without replacement")
    rng = generator(seed)
    rows = int(numpy.prod(shape, dtype=numpy.int64)) if shape else 1
    host = numpy.empty((rows, count), dtype=numpy.int64)
    for r in range(rows):
        host[r] = rng.choice(population, size=count, replace=False)
    if sort:
        host.sort(axis=-1)
    return _place(host.reshape(tuple(shape) + (count,)), xp, device)


def orthogonal(shape: tuple[int, ...], *, seed: Seed, xp: ModuleType | None = None, device: Any = None) -> Any:
    """Blocks of orthogonal rows (Choromanski 2021, §2.4): ``shape = (..., m, d)``.

    Rows come in blocks of ``d`` mutually orthogonal unit vectors (QR of a Gaussian matrix with the
    sign of R's diagonal fixed, so the draw is unique), rescaled to the norms of independent
    Gaussian vectors so that each row is marginally N(0, I_d).
    """
    *lead, m, d = shape
    rng = generator(seed)
    count = int(numpy.prod(lead, dtype=numpy.int64)) if lead else 1
    host = numpy.empty((count, m, d))
    for c in range(count):
        blocks = []
        for _ in range(-(-m // d)):
            qmat, rmat = numpy.linalg.qr(rng.normal(size=(d, d)))
            blocks.append((qmat * numpy.sign(numpy.diag(rmat))).T)
        rows = numpy.concatenate(blocks, axis=0)[:m]
        norms = numpy.linalg.norm(rng.normal(size=(m, d)), axis=-1)
        host[c] = rows * norms[:, None]
    return _place(host.reshape(tuple(shape)), xp, device)
