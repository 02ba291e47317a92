"""Small numerically careful building blocks shared by several mechanisms."""

from __future__ import annotations

from typing import Any

__all__ = ["vector_norm"]


def vector_norm(xp: Any, x: Any, *, axis: int = -1, keepdims: bool = True) -> Any:
    """The Euclidean norm along ``axis`` without overflow or underflow of the squares.

    ``‖x‖ = s·sqrt(Σ (x/s)²)`` with ``s = max |x|`` (0 for a zero vector), as LAPACK's ``dnrm2``
    scales: finite for every finite ``x`` whose norm is representable (|x| up to ~1e308, where
    ``sqrt(Σ x²)`` overflows from |x| ≈ 1e154), and exact to a few ulps.
    """
    s = xp.max(xp.abs(x), axis=axis, keepdims=True)
    safe = xp.where((s == 0) | ~xp.isfinite(s), 1.0, s)
    y = x / safe
    norm = xp.where(xp.isfinite(s), safe * xp.sqrt(xp.sum(y * y, axis=axis, keepdims=True)), s)
    norm = xp.where(s == 0, 0.0, norm)
    return norm if keepdims else xp.squeeze(norm, axis=axis)


def inert_matmul(xp: Any, weights: Any, values: Any) -> Any:
    """``weights @ values`` where a zero weight never lets a non-finite value through (0·NaN = NaN).

    Attention maps hold exact zeros at masked pairs; a NaN or ±∞ stored in a value row that a map row
    does not attend must not reach it. Fast path: finite values, the plain product. Otherwise the
    non-finite entries are zeroed for the product, and an output entry whose row gives a nonzero
    weight to a non-finite value in its column is NaN (garbage in, garbage out, where it was used).
    """
    if bool(xp.all(xp.isfinite(values))):
        return weights @ values
    bad = ~xp.isfinite(values)
    clean = xp.where(bad, 0.0, values)
    used = xp.astype(weights != 0, values.dtype) @ xp.astype(bad, values.dtype)
    return xp.where(used > 0, float("nan"), weights @ clean)


def unbroadcast(xp: Any, grad: Any, shape: tuple[int, ...]) -> Any:
    """The gradient of a broadcast: ``grad`` summed over every axis along which an array of ``shape``
    was broadcast to ``grad.shape`` (extra leading axes, and axes where ``shape`` has 1), reshaped to
    ``shape``."""
    shape = tuple(int(n) for n in shape)
    lead = grad.ndim - len(shape)
    if lead > 0:
        grad = xp.sum(grad, axis=tuple(range(lead)))
    elif lead < 0:
        grad = xp.reshape(grad, (1,) * -lead + tuple(grad.shape))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and int(grad.shape[i]) != 1)
    if axes:
        grad = xp.sum(grad, axis=axes, keepdims=True)
    return xp.reshape(grad, shape)
