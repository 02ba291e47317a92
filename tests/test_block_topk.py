"""block_topk_attention: full attention restricted to the selected blocks, own block, limits, edges."""

from __future__ import annotations

import math

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from tests.helpers import max_abs, qkv_host


def host_blocks(q, k, block_size, top_k, causal=False):
    """Independent host selection: pooled means, own block forced, stable order, expanded to a key mask."""
    L, S = q.shape[-2], k.shape[-2]
    r = q.shape[-3] // k.shape[-3]
    nb = -(-S // block_size)
    pooled = numpy.stack([k[..., c * block_size:(c + 1) * block_size, :].mean(-2) for c in range(nb)], axis=-2)
    g = q @ numpy.swapaxes(numpy.repeat(pooled, r, axis=-3), -1, -2) / math.sqrt(q.shape[-1])
    offset = {False: 0, "top_left": 0, "bottom_right": S - L}[causal]
    allowed = numpy.zeros(q.shape[:-1] + (S,), dtype=bool)
    for i in range(L):
        pos = i + offset
        own = pos // block_size if 0 <= pos < S else None
        score = g[..., i, :].copy()
        if causal:
            score[..., numpy.arange(nb) * block_size > pos] = -numpy.inf
        if own is not None:
            score[..., own] = numpy.inf
        order = numpy.argsort(-score, axis=-1, kind="stable")[..., :top_k]
        for c in range(nb):
            chosen = numpy.any(order == c, axis=-1) & numpy.isfinite(score[..., c]) | (score[..., c] == numpy.inf) & numpy.any(order == c, axis=-1)
            allowed[..., i, c * block_size:(c + 1) * block_size] |= chosen[..., None]
        if causal:
            allowed[..., i, pos + 1:] = False
    return allowed


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_equals_full_restricted_on_every_backend(backend, causal):
    q, k, v = qkv_host(1, length=7, key_length=11)
    args = [backend.asarray(a) for a in (q, k, v)]
    out, lse = reflex.block_topk_attention(*args, block_size=3, top_k=2, causal=causal, return_lse=True)
    pattern = host_blocks(q, k, 3, 2, causal)
    numpy.testing.assert_array_equal(reflex.get("block_topk").pattern(q, k, v, block_size=3, top_k=2, causal=causal), pattern)
    ref, ref_lse = reflex.full_attention(q, k, v, mask=pattern, return_lse=True)
    assert max_abs(backend.to_numpy(out), ref) <= 1e-13 and max_abs(backend.to_numpy(lse), ref_lse) <= 1e-13


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("block_size", [1, 3, 4, 20])
def test_every_block_selected_equals_full(causal, block_size):
    q, k, v = qkv_host(2, length=6, key_length=10)
    a = reflex.block_topk_attention(q, k, v, block_size=block_size, top_k=-(-10 // block_size), causal=causal, return_lse=True)
    b = reflex.full_attention(q, k, v, causal=causal, return_lse=True)
    assert max_abs(a[0], b[0]) <= 1e-14 and max_abs(a[1], b[1]) <= 1e-13


def test_own_block_always_selected_and_ties_to_lower_block():
    q, k, v = qkv_host(3, batch=(), heads=1, kv_heads=1, length=8, key_length=8)
    idx = reflex.block_topk_indices(q, numpy.zeros_like(k), block_size=2, top_k=2)  # all pooled scores tie at 0
    for i in range(8):
        own = i // 2
        first_other = 0 if own != 0 else 1
        assert list(idx[0, i]) == [2 * own, 2 * own + 1, 2 * first_other, 2 * first_other + 1]
    idx = reflex.block_topk_indices(q, k, block_size=2, top_k=1, causal=True)
    numpy.testing.assert_array_equal(idx[0, :, 0], (numpy.arange(8) // 2) * 2)


def test_short_last_block_and_edges():
    q, k, v = qkv_host(4, length=5, key_length=7)
    idx = reflex.block_topk_indices(q, k, block_size=3, top_k=3)
    assert idx.shape == (2, 4, 5, 9) and numpy.sum(idx >= 0, axis=-1).max() == 7
    for L, S in [(1, 1), (1, 4), (4, 1), (3, 0)]:
        q, k, v = qkv_host(5, length=L, key_length=S)
        out = reflex.block_topk_attention(q, k, v, block_size=2, top_k=1)
        ref = reflex.full_attention(q, k, v, mask=host_blocks(q, k, 2, 1) if S else None)
        assert max_abs(out, ref) <= 1e-14


def test_errors():
    q, k, v = qkv_host(6)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        reflex.block_topk_attention(q, k, v, block_size=0, top_k=1)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        reflex.block_topk_attention(q, k, v, block_size=2, top_k=0)


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(1, 4),
       st.sampled_from([False, "top_left", "bottom_right"]), st.integers(0, 10_000))
def test_gather_equals_dense_property(length, key_length, block_size, top_k, causal, seed):
    q, k, v = qkv_host(seed, length=length, key_length=key_length)
    a = reflex.block_topk_attention(q, k, v, block_size=block_size, top_k=top_k, causal=causal, return_lse=True)
    b = reflex.block_topk_attention(q, k, v, block_size=block_size, top_k=top_k, causal=causal, return_lse=True,
                                    implementation="dense")
    assert max_abs(a[0], b[0]) <= 1e-13 and max_abs(a[1], b[1]) <= 1e-13
