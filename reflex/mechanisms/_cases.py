"""Input builders shared by the mechanisms' case builders (host NumPy, explicit seeds)."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.registry import size_scale

__all__ = ["qkv", "dims", "standard", "example_qkv"]


def dims(size: str) -> dict[str, int]:
    """Standard sizes for ``size``: L, S (≠ L), D, E (≠ D), H, G with H % G == 0."""
    n = size_scale(size)
    return {"L": n, "S": n + n // 2 + 1, "D": 8 if n < 64 else 16, "E": 6 if n < 64 else 12, "H": 4, "G": 2}


def qkv(seed: int, *, batch: tuple[int, ...] = (2,), heads: int, kv_heads: int, length: int, key_length: int,
        dim: int, value_dim: int) -> dict[str, Any]:
    """q, k, v with N(0, 1) entries, each from its own stream of ``seed``."""
    return {
        "q": random.normal((*batch, heads, length, dim), seed=(seed, 0)),
        "k": random.normal((*batch, kv_heads, key_length, dim), seed=(seed, 1)),
        "v": random.normal((*batch, kv_heads, key_length, value_dim), seed=(seed, 2)),
    }


def standard(size: str, seed: int, **shapes: int) -> tuple[dict[str, int], dict[str, Any]]:
    """``(dims(size), q/k/v)`` with GQA (H query heads, G kv heads), L ≠ S, D ≠ E.

    Keyword overrides (``heads``, ``kv_heads``, ``length``, ``key_length``, ``dim``, ``value_dim``,
    ``batch``) replace the standard shape for this case.
    """
    d = dims(size)
    base = dict(heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    return d, qkv(seed, **{**base, **shapes})


def example_qkv(seq: int, heads: int, dim: int, seed: int) -> dict[str, Any]:
    """q, k, v of shape ``(1, heads, seq, dim)`` for ``reflex run`` examples (L = S, D = E, no GQA)."""
    return qkv(seed, batch=(1,), heads=heads, kv_heads=heads, length=seq, key_length=seq, dim=dim, value_dim=dim)
