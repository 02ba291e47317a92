"""topk_attention: full attention restricted to the top-k keys, ties to the lower index, limits, edges."""

from __future__ import annotations

import math

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def host_selection(q, k, top_k, *, allowed=None, scale=None):
    """Independent host selection: stable argsort of −scores, masked keys excluded → boolean pattern."""
    r = q.shape[-3] // k.shape[-3]
    s = (1 / math.sqrt(q.shape[-1]) if scale is None else scale) * q @ numpy.swapaxes(numpy.repeat(k, r, axis=-3), -1, -2)
    if allowed is not None:
        s = numpy.where(allowed, s, -numpy.inf)
    order = numpy.argsort(-s, axis=-1, kind="stable")[..., :top_k]
    pattern = numpy.zeros(s.shape, dtype=bool)
    numpy.put_along_axis(pattern, order, True, axis=-1)
    return pattern & numpy.isfinite(s)


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_equals_full_restricted_to_pattern_on_every_backend(backend, causal):
    q, k, v = qkv_host(1, length=7, key_length=10)
    mask = random.uniform((2, 1, 7, 10), seed=3) < 0.8
    args = [backend.asarray(a) for a in (q, k, v)]
    out, lse = reflex.topk_attention(*args, top_k=4, causal=causal, mask=backend.asarray(mask), return_lse=True)
    pattern = reflex.get("topk").pattern(q, k, v, top_k=4, causal=causal, mask=mask)
    ref, ref_lse = reflex.full_attention(q, k, v, mask=pattern, return_lse=True)
    assert max_abs(backend.to_numpy(out), ref) <= 1e-13 and max_abs(backend.to_numpy(lse), ref_lse) <= 1e-13
    allowed = mask.copy()
    if causal:
        offset = 0 if causal == "top_left" else 3
        allowed = allowed & (numpy.arange(10)[None, :] <= numpy.arange(7)[:, None] + offset)
    numpy.testing.assert_array_equal(pattern, host_selection(q, k, 4, allowed=allowed))


def test_indices_identical_across_backends(backend):
    q, k, _ = qkv_host(2, length=6, key_length=9)
    want = reflex.topk_indices(q, k, top_k=5, causal=True)
    got = backend.to_numpy(reflex.topk_indices(backend.asarray(q), backend.asarray(k), top_k=5, causal=True))
    numpy.testing.assert_array_equal(got, want)
    assert got.dtype == numpy.int64 and got.shape == (2, 4, 6, 5)
    assert numpy.all(got[..., 0, 1:] == -1) and numpy.all(got[..., 0, 0] == 0)  # row 0 sees only key 0


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_top_k_at_least_S_equals_full(causal):
    q, k, v = qkv_host(3, length=5, key_length=8)
    for top_k in (8, 20):
        a = reflex.topk_attention(q, k, v, top_k=top_k, causal=causal, return_lse=True)
        b = reflex.full_attention(q, k, v, causal=causal, return_lse=True)
        assert max_abs(a[0], b[0]) <= 1e-14 and max_abs(a[1], b[1]) <= 1e-13


def test_ties_go_to_the_lower_index():
    q, k, v = qkv_host(4, batch=(), heads=1, kv_heads=1, length=3, key_length=6)
    k = numpy.repeat(k[:, :3], 2, axis=-2)  # keys 2t and 2t+1 identical: every score tied in pairs
    idx = reflex.topk_indices(q, k, top_k=3)
    s = q @ k[0].T
    for i in range(3):
        order = sorted(range(6), key=lambda j: (-s[0, i, j], j))[:3]
        assert list(idx[0, i]) == order
        assert all(j % 2 == 0 or j - 1 in idx[0, i] for j in idx[0, i])  # an odd key only after its even twin
    constant = numpy.zeros_like(k)  # all scores equal: the first k keys
    numpy.testing.assert_array_equal(reflex.topk_indices(q, constant, top_k=4)[0], numpy.tile([0, 1, 2, 3], (3, 1)))


def test_fewer_allowed_keys_and_fully_masked_rows():
    q, k, v = qkv_host(5, length=4, key_length=6)
    mask = numpy.zeros((4, 6), dtype=bool)
    mask[1, 2] = True
    mask[2, :3] = True
    mask[3] = True
    out, lse = reflex.topk_attention(q, k, v, top_k=4, mask=mask, return_lse=True)
    idx = reflex.topk_indices(q, k, top_k=4, mask=mask)
    assert numpy.all(idx[..., 0, :] == -1) and numpy.all(out[..., 0, :] == 0) and numpy.all(lse[..., 0] == -numpy.inf)
    assert numpy.all(idx[..., 1, 0] == 2) and numpy.all(idx[..., 1, 1:] == -1)
    rep = numpy.repeat(v, 2, axis=-3)
    assert max_abs(out[..., 1, :], rep[..., 2, :]) <= 1e-15
    ref = reflex.full_attention(q, k, v, mask=mask[None, None] & host_selection(q, k, 4, allowed=mask))
    assert max_abs(out, ref) <= 1e-14


def test_key_only_mask_broadcasts():
    """A 1-D mask ``(S,)`` (one flag per key) broadcasts like any other term, as in full_attention."""
    q, k, v = qkv_host(9, length=4, key_length=6)
    keys = numpy.array([True, False, True, True, False, True])
    out, lse = reflex.topk_attention(q, k, v, top_k=2, mask=keys, return_lse=True)
    pattern = host_selection(q, k, 2, allowed=keys)
    ref, ref_lse = reflex.full_attention(q, k, v, mask=pattern, return_lse=True)
    assert max_abs(out, ref) <= 1e-14 and max_abs(lse, ref_lse) <= 1e-13


@pytest.mark.parametrize("length,key_length", [(1, 1), (1, 5), (6, 1), (3, 0), (0, 4)])
def test_edge_lengths(length, key_length):
    q, k, v = qkv_host(6, length=length, key_length=key_length)
    out, lse = reflex.topk_attention(q, k, v, top_k=2, return_lse=True)
    ref, ref_lse = reflex.full_attention(q, k, v, mask=host_selection(q, k, 2) if length and key_length else None,
                                         return_lse=True)
    assert out.shape == (2, 4, length, 3) and max_abs(out, ref) <= 1e-14 and max_abs(lse, ref_lse) <= 1e-13


def test_compute_dtype_and_inputs_untouched():
    q, k, v = qkv_host(7)
    q32, k32, v32 = (a.astype(numpy.float32) for a in (q, k, v))
    assert reflex.topk_attention(q32, k32, v32, top_k=3).dtype == numpy.float64
    assert reflex.topk_attention(q, k, v, top_k=3, compute_dtype="float32").dtype == numpy.float32


def test_errors():
    q, k, v = qkv_host(8)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        reflex.topk_attention(q, k, v, top_k=0)
    with pytest.raises(ValueError, match="implementation must be one of"):
        reflex.topk_attention(q, k, v, top_k=2, implementation="tiled")
    with pytest.raises(TypeError, match="mask must be a boolean"):
        reflex.topk_attention(q, k, v, top_k=2, mask=numpy.ones((7, 9)))


@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 8), st.integers(1, 8), st.integers(1, 9),
       st.sampled_from([False, "top_left", "bottom_right"]), st.integers(0, 10_000))
def test_gather_equals_dense_property(per_group, kv_heads, length, key_length, top_k, causal, seed):
    q, k, v = qkv_host(seed, heads=per_group * kv_heads, kv_heads=kv_heads, length=length, key_length=key_length)
    a = reflex.topk_attention(q, k, v, top_k=top_k, causal=causal, return_lse=True)
    b = reflex.topk_attention(q, k, v, top_k=top_k, causal=causal, return_lse=True, implementation="dense")
    assert max_abs(a[0], b[0]) <= 1e-13 and max_abs(a[1], b[1]) <= 1e-13
