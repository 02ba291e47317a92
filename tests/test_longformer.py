"""longformer_attention: local rows = full with band ∪ global keys; global rows = full attention (own projections)."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from tests.helpers import max_abs, qkv_host
from tests.test_dilated import dilated_mask


def local_mask(length, key_length, left, right, dilation, positions, offset=0):
    mask = dilated_mask(length, key_length, left, right, dilation, offset)
    mask[:, list(positions)] = True
    return mask


def reference(q, k, v, window, positions, dilation=1, offset=0, projections=None):
    """Dense assembly row by row from two full_attention calls."""
    length, key_length = q.shape[-2], k.shape[-2]
    out, lse = reflex.full_attention(q, k, v, mask=local_mask(length, key_length, *window, dilation, positions, offset),
                                     return_lse=True)
    g_out, g_lse = reflex.full_attention(*(projections or (q, k, v)), return_lse=True)
    for g in positions:
        i = g - offset
        if 0 <= i < length:
            out[..., i, :], lse[..., i] = g_out[..., i, :], g_lse[..., i]
    return out, lse


@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled"])
@pytest.mark.parametrize("separate", [False, True])
def test_equals_reference(backend, implementation, separate):
    q, k, v = qkv_host(1, length=10, key_length=10)
    projections = qkv_host(2, length=10, key_length=10) if separate else None
    kwargs = dict(zip(("q_global", "k_global", "v_global"), map(backend.asarray, projections))) if separate else {}
    out, lse = reflex.longformer_attention(*map(backend.asarray, (q, k, v)), window=(2, 2), global_indices=[0, 6],
                                           implementation=implementation, return_lse=True, **kwargs)
    ref = reference(q, k, v, (2, 2), [0, 6], projections=projections)
    assert max_abs(backend.to_numpy(out), ref[0]) <= 1e-13 and max_abs(backend.to_numpy(lse), ref[1]) <= 1e-13


def test_pattern_record_is_full_equivalent_without_projections():
    q, k, v = qkv_host(3, length=9, key_length=12)
    params = dict(window=(1, 0), global_indices=[2, 11], dilation=2, alignment="bottom_right")
    pattern = reflex.get("longformer").pattern(q, k, v, **params)
    for implementation in ("numba", "dense", "tiled"):
        out = reflex.longformer_attention(q, k, v, **params, implementation=implementation)
        assert max_abs(out, reflex.full_attention(q, k, v, mask=pattern)) <= 1e-13
    expected = local_mask(9, 12, 1, 0, 2, [2, 11], 3)
    expected[11 - 3] = True
    numpy.testing.assert_array_equal(pattern[0, 0], expected)


def test_no_globals_is_sliding_window():
    q, k, v = qkv_host(4, length=7, key_length=7)
    assert max_abs(reflex.longformer_attention(q, k, v, window=(2, 1)),
                   reflex.sliding_window_attention(q, k, v, window=(2, 1))) <= 1e-15


@given(length=st.integers(1, 14), data=st.data(), left=st.integers(-1, 4), right=st.integers(-1, 4),
       dilation=st.integers(1, 3), separate=st.booleans())
def test_hypothesis(length, data, left, right, dilation, separate):
    key_length = data.draw(st.integers(1, 14))
    positions = data.draw(st.lists(st.integers(0, key_length - 1), unique=True, max_size=3))
    alignment = data.draw(st.sampled_from(["top_left", "bottom_right"]))
    offset = key_length - length if alignment == "bottom_right" else 0
    q, k, v = qkv_host(5, length=length, key_length=key_length)
    projections = qkv_host(6, length=length, key_length=key_length) if separate else None
    kwargs = dict(zip(("q_global", "k_global", "v_global"), projections)) if separate else {}
    ref = reference(q, k, v, (left, right), positions, dilation, offset, projections)
    for implementation in ("numba", "tiled"):
        out = reflex.longformer_attention(q, k, v, window=(left, right), global_indices=positions, dilation=dilation,
                                          alignment=alignment, implementation=implementation, return_lse=True, **kwargs)
        assert max_abs(out[0], ref[0]) <= 1e-13 and max_abs(out[1], ref[1]) <= 1e-13


def test_errors():
    q, k, v = qkv_host(7)
    with pytest.raises(ValueError, match="all of q_global"):
        reflex.longformer_attention(q, k, v, window=(1, 1), global_indices=[0], q_global=q)
    with pytest.raises(ValueError, match="q_global has shape"):
        reflex.longformer_attention(q, k, v, window=(1, 1), global_indices=[0], q_global=q[..., :3, :], k_global=k,
                                    v_global=v)
    with pytest.raises(ValueError, match="global_indices"):
        reflex.longformer_attention(q, k, v, window=(1, 1), global_indices=[100])
