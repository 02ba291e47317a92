"""axial_attention: each step equals full_attention with the row/column mask; rows-then-cols composes them."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from tests.helpers import max_abs, qkv_host


def grid_masks(rows, cols):
    r, c = numpy.divmod(numpy.arange(rows * cols), cols)
    return r[:, None] == r[None, :], c[:, None] == c[None, :]


@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled"])
def test_steps_and_composition(backend, implementation):
    q, k, v = qkv_host(1, length=12, key_length=12)
    row_mask, col_mask = grid_masks(3, 4)
    args = list(map(backend.asarray, (q, k, v)))
    for axis, mask in (("rows", row_mask), ("cols", col_mask)):
        out, lse = reflex.axial_attention(*args, shape=(3, 4), axis=axis, implementation=implementation, return_lse=True)
        ref = reflex.full_attention(q, k, v, mask=mask, return_lse=True)
        assert max_abs(backend.to_numpy(out), ref[0]) <= 1e-13 and max_abs(backend.to_numpy(lse), ref[1]) <= 1e-13
    out = reflex.axial_attention(*args, shape=(3, 4), implementation=implementation)
    row = reflex.full_attention(q, k, v, mask=row_mask)
    k_per_head = numpy.repeat(k, 2, axis=-3)  # H = 4 query heads over G = 2 kv heads
    ref = reflex.full_attention(q, k_per_head, row, mask=col_mask)
    assert max_abs(backend.to_numpy(out), ref) <= 1e-13


def test_degenerate_grids_and_pattern_record():
    q, k, v = qkv_host(2, length=5, key_length=5, kv_heads=4)
    assert max_abs(reflex.axial_attention(q, k, v, shape=(1, 5), axis="rows"), reflex.full_attention(q, k, v)) <= 1e-13
    assert max_abs(reflex.axial_attention(q, k, v, shape=(5, 1), axis="rows"), v) <= 1e-15
    row_mask, col_mask = grid_masks(5, 1)
    numpy.testing.assert_array_equal(reflex.get("axial").pattern(q, k, v, shape=(5, 1))[0, 0], row_mask | col_mask)


@given(rows=st.integers(1, 5), cols=st.integers(1, 5), axis=st.sampled_from(["rows", "cols"]))
def test_hypothesis(rows, cols, axis):
    q, k, v = qkv_host(3, length=rows * cols, key_length=rows * cols)
    row_mask, col_mask = grid_masks(rows, cols)
    ref = reflex.full_attention(q, k, v, mask=row_mask if axis == "rows" else col_mask)
    assert max_abs(reflex.axial_attention(q, k, v, shape=(rows, cols), axis=axis, implementation="tiled"), ref) <= 1e-13


def test_errors():
    q, k, v = qkv_host(4, length=6, key_length=6)
    with pytest.raises(ValueError, match="needs L = S"):
        reflex.axial_attention(q, k, v, shape=(2, 2))
    with pytest.raises(ValueError, match="axis"):
        reflex.axial_attention(q, k, v, shape=(2, 3), axis="depth")
    with pytest.raises(ValueError, match="shape"):
        reflex.axial_attention(q, k, v, shape=6)
