"""global_attention: equals full_attention with the global-token mask, every kernel, every backend."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from tests.helpers import max_abs, qkv_host


def global_mask(length, key_length, positions, offset=0):
    mask = numpy.zeros((length, key_length), dtype=bool)
    for i in range(length):
        a = i + offset
        for j in range(key_length):
            mask[i, j] = a in positions or j in positions or j == a
    return mask


def check(backend, q, k, v, implementation, positions, alignment="top_left"):
    args = [backend.asarray(a) for a in (q, k, v)]
    out, lse = reflex.global_attention(*args, global_indices=positions, alignment=alignment,
                                       implementation=implementation, return_lse=True)
    offset = k.shape[-2] - q.shape[-2] if alignment == "bottom_right" else 0
    mask = global_mask(q.shape[-2], k.shape[-2], set(positions), offset)
    ref = reflex.full_attention(q, k, v, mask=mask, return_lse=True, implementation="dense")
    assert max_abs(backend.to_numpy(out), ref[0]) <= 1e-13
    assert max_abs(backend.to_numpy(lse), ref[1]) <= 1e-13


@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled"])
@pytest.mark.parametrize("positions,alignment", [([0], "top_left"), ([2, 7], "bottom_right"), ([], "top_left"),
                                                 ([11], "top_left")])
def test_equals_full_with_mask(backend, implementation, positions, alignment):
    q, k, v = qkv_host(1, length=8, key_length=12)
    check(backend, q, k, v, implementation, positions, alignment)


def test_array_indices_rows_without_keys_and_pattern_record():
    q, k, v = qkv_host(2, length=9, key_length=4)  # top-left: queries 4..8 have no own key
    out, lse = reflex.global_attention(q, k, v, global_indices=numpy.array([], dtype=int), return_lse=True)
    assert numpy.all(out[..., 4:, :] == 0) and numpy.all(lse[..., 4:] == -numpy.inf)
    pattern = reflex.get("global").pattern(q, k, v, global_indices=numpy.array([1, 3]))
    numpy.testing.assert_array_equal(pattern[0, 2], global_mask(9, 4, {1, 3}))


@given(length=st.integers(1, 16), key_length=st.integers(1, 16), data=st.data(),
       alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_hypothesis(length, key_length, data, alignment):
    from tests.conftest import make_backend

    positions = data.draw(st.lists(st.integers(0, key_length - 1), unique=True, max_size=4))
    q, k, v = qkv_host(3, length=length, key_length=key_length)
    for implementation in ("numba", "tiled"):
        check(make_backend("numpy"), q, k, v, implementation, positions, alignment)


def test_errors():
    q, k, v = qkv_host(4, length=5, key_length=6)
    with pytest.raises(ValueError, match="global_indices must lie in"):
        reflex.global_attention(q, k, v, global_indices=[6])
    with pytest.raises(ValueError, match="distinct"):
        reflex.global_attention(q, k, v, global_indices=[1, 1])
    with pytest.raises(ValueError, match="sequence of ints"):
        reflex.global_attention(q, k, v, global_indices=[1.5])
