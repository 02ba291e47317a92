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
