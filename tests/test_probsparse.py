"""probsparse_attention: NumPy Informer (catalogue semantics) on every backend, u = L is full, lazy rows, errors."""

from __future__ import annotations

import math

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def naive(q, k, v, samples, u, *, offset=None):
    r = q.shape[-3] // k.shape[-3]
    k, v = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    length, key_length = q.shape[-2], k.shape[-2]
    s = q @ numpy.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    sampled = numpy.take_along_axis(s, numpy.broadcast_to(samples, s.shape[:-1] + samples.shape[-1:]), axis=-1)
    sparsity = sampled.max(-1) - sampled.mean(-1)
    chosen = numpy.argsort(-sparsity, axis=-1, kind="stable")[..., :u]
    is_chosen = numpy.zeros(sparsity.shape, dtype=bool)
    numpy.put_along_axis(is_chosen, chosen, True, axis=-1)
    allowed = numpy.ones((length, key_length), dtype=bool)
    if offset is None:
        lazy = numpy.broadcast_to(v.mean(-2, keepdims=True), q.shape[:-1] + v.shape[-1:])
    else:
        allowed = numpy.arange(key_length)[None, :] <= numpy.arange(length)[:, None] + offset
        lazy = numpy.stack([v[..., :i + offset + 1, :].mean(-2) if i + offset >= 0 else numpy.zeros(v.shape[:-2] + v.shape[-1:])
                            for i in range(length)], axis=-2)
    masked = numpy.where(allowed, s, -numpy.inf)
    m = masked.max(-1, keepdims=True)
    w = numpy.exp(masked - numpy.where(numpy.isfinite(m), m, 0))
    full = (w @ v) / numpy.maximum(w.sum(-1, keepdims=True), 1e-300)
    return numpy.where(is_chosen[..., None], full, lazy)


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("u", [1, 3])
def test_matches_informer_formula_on_every_backend(backend, causal, u):
    q, k, v = qkv_host(1, length=8, key_length=10)
    samples = random.integers((8, 4), seed=2, low=0, high=10)
    out = reflex.probsparse_attention(*(backend.asarray(a) for a in (q, k, v)), top_u=u,
                                      sample_indices=backend.asarray(samples), causal=causal)
    offset = None if not causal else 0 if causal == "top_left" else 2
    assert max_abs(backend.to_numpy(out), naive(q, k, v, samples, u, offset=offset)) < 1e-14


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("shape", [(7, 9), (9, 4)])
def test_every_query_active_is_full_attention(causal, shape):
    q, k, v = qkv_host(3, length=shape[0], key_length=shape[1])
    out = reflex.probsparse_attention(q, k, v, top_u=shape[0], causal=causal)
    assert max_abs(out, reflex.full_attention(q, k, v, causal=causal)) <= 1e-12


def test_default_counts_and_seeded_samples():
    q, k, v = qkv_host(4, length=40, key_length=30)
    # factor 1: u = ceil(ln 40) = 4 queries, n = ceil(ln 30) = 4 samples
    samples = random.integers((40, 4), seed=5, low=0, high=30)
    seeded = reflex.probsparse_attention(q, k, v, factor=1, seed=5)
    assert max_abs(seeded, reflex.probsparse_attention(q, k, v, factor=1, sample_indices=samples)) == 0.0
    assert max_abs(seeded, naive(q, k, v, samples, 4)) < 1e-14
    lazy_rows = numpy.all(numpy.abs(seeded - numpy.repeat(v, 2, axis=-3).mean(-2, keepdims=True)) < 1e-15, axis=-1)
    assert numpy.all(lazy_rows.sum(-1) == 40 - 4)


def test_no_active_query_gives_the_lazy_output():
    q, k, v = qkv_host(6, length=1, key_length=5)
    out = reflex.probsparse_attention(q, k, v)  # L = 1: u = 5·⌈ln 1⌉ = 0
    assert max_abs(out, numpy.broadcast_to(numpy.repeat(v, 2, axis=-3).mean(-2, keepdims=True), out.shape)) < 1e-15
    causal = reflex.probsparse_attention(*qkv_host(6, length=6, key_length=3), top_u=0, causal="bottom_right")
    assert numpy.all(causal[..., :3, :] == 0)


def test_errors():
    q, k, v = qkv_host(7, length=6, key_length=5)
    with pytest.raises(ValueError, match="no hidden randomness"):
        reflex.probsparse_attention(q, k, v, top_u=2)
    with pytest.raises(ValueError, match=r"sample_indices must have shape \(L, n\) = \(6, n\)"):
        reflex.probsparse_attention(q, k, v, top_u=2, sample_indices=numpy.zeros((5, 2), dtype=numpy.int64))
    with pytest.raises(ValueError, match=r"sample_indices must lie in \[0, 5\)"):
        reflex.probsparse_attention(q, k, v, top_u=2, sample_indices=numpy.full((6, 2), 5))
    with pytest.raises(ValueError, match="top_u must be at most L = 6"):
        reflex.probsparse_attention(q, k, v, top_u=7)
    with pytest.raises(ValueError, match="not both"):
        reflex.probsparse_attention(q, k, v, top_u=2, sample_indices=numpy.zeros((6, 2), dtype=numpy.int64), seed=1)
