"""dilated_attention: equals full_attention with the dilated band mask, every kernel, every backend."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from tests.helpers import max_abs, qkv_host


def dilated_mask(length, key_length, left, right, dilation, offset=0):
    """Host construction from the catalogue: j = i + δ + d·t, t ∈ [−left, right]."""
    mask = numpy.zeros((length, key_length), dtype=bool)
    for i in range(length):
        lo = -key_length - length if left < 0 else -left
        hi = key_length + length if right < 0 else right
        for t in range(lo, hi + 1):
            j = i + offset + dilation * t
            if 0 <= j < key_length:
                mask[i, j] = True
    return mask


def check(backend, q, k, v, implementation, window, dilation, alignment="top_left"):
    args = [backend.asarray(a) for a in (q, k, v)]
    out, lse = reflex.dilated_attention(*args, window=window, dilation=dilation, alignment=alignment,
                                        implementation=implementation, return_lse=True)
    offset = k.shape[-2] - q.shape[-2] if alignment == "bottom_right" else 0
    mask = dilated_mask(q.shape[-2], k.shape[-2], *window, dilation, offset)
    ref = reflex.full_attention(q, k, v, mask=mask, return_lse=True, implementation="dense")
    assert max_abs(backend.to_numpy(out), ref[0]) <= 1e-13
    assert max_abs(backend.to_numpy(lse), ref[1]) <= 1e-13


@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled", "gather"])
@pytest.mark.parametrize("window,dilation,alignment", [((2, 1), 2, "top_left"), ((3, 0), 3, "bottom_right"),
                                                       ((-1, 1), 2, "top_left"), ((0, 0), 4, "top_left")])
def test_equals_full_with_mask(backend, implementation, window, dilation, alignment):
    q, k, v = qkv_host(1, length=9, key_length=14)
    check(backend, q, k, v, implementation, window, dilation, alignment)


def test_dilation_one_is_sliding_window_and_pattern_record():
    q, k, v = qkv_host(2, length=8, key_length=8)
    a = reflex.dilated_attention(q, k, v, window=(2, 1), dilation=1)
    b = reflex.sliding_window_attention(q, k, v, window=(2, 1))
    assert max_abs(a, b) <= 1e-15
    pattern = reflex.get("dilated").pattern(q, k, v, window=(1, 2), dilation=3)
    numpy.testing.assert_array_equal(pattern[1, 3], dilated_mask(8, 8, 1, 2, 3))


@given(length=st.integers(1, 20), key_length=st.integers(1, 20), left=st.integers(-1, 6), right=st.integers(-1, 6),
       dilation=st.integers(1, 5), alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_hypothesis(length, key_length, left, right, dilation, alignment):
    from tests.conftest import make_backend

    q, k, v = qkv_host(3, length=length, key_length=key_length, kv_heads=1)
    for implementation in ("numba", "tiled", "gather"):
        check(make_backend("numpy"), q, k, v, implementation, (left, right), dilation, alignment)


def test_errors():
    q, k, v = qkv_host(4)
    with pytest.raises(ValueError, match="dilation"):
        reflex.dilated_attention(q, k, v, window=(1, 1), dilation=0)
    with pytest.raises(ValueError, match="window"):
        reflex.dilated_attention(q, k, v, window=(1,), dilation=2)
