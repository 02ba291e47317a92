"""Small shared test utilities: host inputs, and the dense oracle on an explicit boolean pattern."""

from __future__ import annotations

from typing import Any

import numpy

from reflex import random


def qkv_host(seed: int, *, batch: tuple[int, ...] = (2,), heads: int = 4, kv_heads: int = 2, length: int = 7,
             key_length: int = 9, dim: int = 5, value_dim: int = 3) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """Host float64 q (..., H, L, D), k (..., G, S, D), v (..., G, S, E) from ``seed``."""
    return (
        random.normal((*batch, heads, length, dim), seed=(seed, 0)),
        random.normal((*batch, kv_heads, key_length, dim), seed=(seed, 1)),
        random.normal((*batch, kv_heads, key_length, value_dim), seed=(seed, 2)),
    )


def max_abs(a: Any, b: Any) -> float:
    """max |a − b| over host arrays, treating equal infinities as equal."""
    a, b = numpy.asarray(a, dtype=numpy.float64), numpy.asarray(b, dtype=numpy.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    same = a == b
    with numpy.errstate(invalid="ignore"):
        diff = numpy.where(same, 0.0, numpy.abs(a - b))
    return float(numpy.max(diff)) if diff.size else 0.0


def softmax_map(q: numpy.ndarray, k: numpy.ndarray, causal: bool = False) -> numpy.ndarray:
    """Host softmax probabilities ``(..., H, L, S)`` of scale 1/√D scores, kv heads repeated (causal: top-left)."""
    k = numpy.repeat(k, q.shape[-3] // k.shape[-3], axis=-3)
    s = q @ numpy.swapaxes(k, -1, -2) / numpy.sqrt(q.shape[-1])
    if causal:
        s = numpy.where(numpy.tri(s.shape[-2], s.shape[-1], dtype=bool), s, -numpy.inf)
    e = numpy.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
