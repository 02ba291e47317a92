"""Reformer LSH hashing and sorting (Kitaev et al. 2020 §2): angular buckets of shared query-keys, the
sort that groups them, and the length-normalised keys Hugging Face attends with. Used by
:func:`reflex.lsh_attention` (:mod:`reflex.mechanisms.lsh`)."""

from __future__ import annotations

import importlib
import math
from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import is_plain_numpy, namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._patterns import check_positive_int
from reflex.mechanisms._options import typed_options

__all__ = ["lsh_buckets", "lsh_sort", "lsh_keys"]

NORM_EPSILON = 1e-6   # k̂ = x / sqrt(mean(x²) + ε), as Hugging Face's ``_len_norm``
IMPLEMENTATIONS = ("auto", "array_api", "numba")


# --- arguments -----------------------------------------------------------------------------------

def _factors(n_buckets: Any) -> tuple[int, ...]:
    """``n_buckets`` as bucket factors: an even int, 1 (one bucket), or a tuple of even ints (factorised)."""
    parts = tuple(n_buckets) if isinstance(n_buckets, (tuple, list)) else (n_buckets,)
    ok = parts and all(not isinstance(f, bool) and isinstance(f, int) and f >= 2 and f % 2 == 0 for f in parts)
    if parts == (1,) or ok:
        return tuple(int(f) for f in parts)
    raise ValueError(f"n_buckets must be 1, an even int >= 2, or a tuple of even ints (factorised); got {n_buckets!r}")


def _rotations(xp: Any, device: Any, dtype: Any, heads: int, dim: int, factors: tuple[int, ...], n_hashes: int,
               rotations: Any, seed: Any) -> Any:
    """``(H, D, n_hashes, R/2)`` rotations (R = Σ factors) from the argument or drawn from ``seed``."""
    shape = (heads, dim, n_hashes, sum(f // 2 for f in factors) if factors != (1,) else 0)
    if (rotations is None) == (seed is None):
        raise ValueError("pass exactly one of rotations= (H, D, n_hashes, n_buckets/2) or seed=")
    if rotations is None:
        return xp.astype(random.normal(shape, seed=seed, xp=xp, device=device), dtype)
    if tuple(int(n) for n in rotations.shape) != shape:
        raise ValueError(f"rotations must have shape (H, D, n_hashes, n_buckets/2) = {shape}; got {tuple(rotations.shape)}")
    return _kernels.check_array(xp, device, dtype, "rotations", rotations, against="qk")


def _numba(implementation: str, *arrays: Any, dtype_ok: bool) -> bool:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}")
    plain = dtype_ok and all(a is None or is_plain_numpy(a) for a in arrays)
    if implementation == "numba" and not plain:
        raise ValueError("implementation='numba' needs plain NumPy inputs and a float64 compute dtype")
    return implementation == "numba" or implementation == "auto" and plain


def _bucketing() -> Any:
    return importlib.import_module("reflex.backends.numba_kernels.bucketing")


# --- hashing and sorting -------------------------------------------------------------------------

def _hash(xp: Any, x: Any, rot: Any, factors: tuple[int, ...]) -> Any:
    """Array-API hashing of ``x (..., H, L, D)``: projections summed over d in order, argmax per factor."""
    n_hashes = rot.shape[2]
    shape = (*x.shape[:-3], x.shape[-3], n_hashes, x.shape[-2])
    if factors == (1,):
        return xp.zeros(shape, dtype=xp.int64, device=device_of(x))
    xs = xp.expand_dims(xp.expand_dims(x, axis=-3), axis=-1)  # (..., H, 1, L, D, 1)
    proj = None
    for d in range(x.shape[-1]):
        term = xs[..., d, :] * xp.expand_dims(rot[:, d, :, :], axis=-2)  # (..., H, n_hashes, L, R/2)
        proj = term if proj is None else proj + term
    buckets = xp.zeros(shape, dtype=xp.int64, device=device_of(x))
    offset, product = 0, 1
    for f in factors:
        part = proj[..., offset:offset + f // 2]
        buckets = buckets + product * xp.astype(xp.argmax(xp.concat([part, -part], axis=-1), axis=-1), xp.int64)
        offset, product = offset + f // 2, product * f
    return buckets


@typed_options()
def lsh_keys(qk: Any, /, *, compute_dtype: Any = None) -> Any:
    """The shared keys of LSH attention: ``k̂ = x / sqrt(mean_d(x²) + 1e-6)``, shape ``(..., H, L, D)``.

    With the default scale 1/√D this is Hugging Face's ``_len_and_dim_norm`` key: near unit length.
    """
    p = _kernels.prepare(qk, qk, qk, compute_dtype=compute_dtype)
    return _unit_keys(p.xp, p.q)


def _unit_keys(xp: Any, x: Any) -> Any:
    return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + NORM_EPSILON)


@typed_options()
def lsh_buckets(qk: Any, /, *, n_buckets: int | tuple[int, ...], n_hashes: int = 1, rotations: Any = None,
                seed: Any = None, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Angular LSH buckets of ``qk (..., H, L, D)`` → int64 ``(..., H, n_hashes, L)`` in ``[0, n_buckets)``.

    .. math::

        h_r(x) = \\arg\\max\\,[x R_r;\\; -x R_r] \\quad (\\text{first index on ties})

    ``rotations (H, D, n_hashes, n_buckets/2)``: one Gaussian matrix per head and round (shared over
    the batch, not orthogonalised), or ``seed`` to draw them with :mod:`reflex.random`. Factorised
    buckets (``n_buckets=(f0, f1, …)``): the rotation columns are split per factor and
    ``h = a0 + f0·a1 + f0·f1·a2 + …``. ``n_buckets=1`` puts every token in bucket 0. The projection
    is summed over d = 0, …, D−1 in that order with elementwise float64 operations on every backend
    (and in the Numba kernel), so buckets are identical across backends. Round offsets are not
    added (Hugging Face returns ``bucket + round·n_buckets``).

    Reference: Kitaev, Kaiser, Levskaya 2020, "Reformer", §2 (angular LSH, Andoni et al. 2015).
    """
    factors = _factors(n_buckets)
    p = _kernels.prepare(qk, qk, qk, compute_dtype=compute_dtype)
    n_hashes = check_positive_int("n_hashes", n_hashes)
    rot = _rotations(p.xp, p.device, p.q.dtype, p.heads, p.dim, factors, n_hashes, rotations, seed)
    if _numba(implementation, qk, rotations, dtype_ok=p.q.dtype == p.xp.float64):
        flat = p.xp.reshape(p.q, (-1, p.heads, p.length, p.dim))
        out = _bucketing().hash_vectors(flat, rot, factors)
        return p.xp.reshape(out, (*p.batch, p.heads, n_hashes, p.length))
    return _hash(p.xp, p.q, rot, factors)


@typed_options()
def lsh_sort(buckets: Any, /) -> Any:
    """Positions stably sorted by bucket along the last axis: ``order[..., t]`` is the t-th position.

    Ties (equal buckets) keep position order, so the sort is by (bucket, position) — Hugging Face's
    ``sorted_bucket_idx`` for round r is ``r·L + order[..., r, :]``.
    """
    xp = namespace(buckets)
    if not xp.isdtype(buckets.dtype, "integral"):
        raise TypeError(f"buckets must be an integer array; got dtype {buckets.dtype}")
    return xp.astype(xp.argsort(buckets, axis=-1, stable=True), xp.int64)


def unit_keys_vjp(xp: Any, x: Any, d_keys: Any) -> Any:
    """The adjoint of ``k̂ = x·r``, ``r = (mean_d x² + ε)^{-1/2}``: ``dx = r·dk̂ − (r³/D)(dk̂·x)·x``."""
    r = 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + NORM_EPSILON)
    dot = xp.sum(d_keys * x, axis=-1, keepdims=True)
    return r * d_keys - (r * r * r / int(x.shape[-1])) * dot * x
