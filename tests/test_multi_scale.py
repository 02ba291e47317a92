"""multi_scale_attention: per-head band masks == full; windows >= S == full; each head == sliding_window."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from tests.helpers import max_abs, qkv_host


def bands(windows, length, key_length, offset):
    rel = numpy.arange(key_length)[None, :] - numpy.arange(length)[:, None] - offset
    out = []
    for w in windows:
        left, right = (w, w) if isinstance(w, int) else w
        out.append(((left < 0) | (rel >= -left)) & ((right < 0) | (rel <= right)))
    return numpy.stack(out)


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_equals_full_with_per_head_bands(backend, implementation, alignment, small_tiles):
    q, k, v = qkv_host(0, length=7, key_length=10)
    windows = [0, (2, 0), (-1, 1), (1, -1)]
    offset = 0 if alignment == "top_left" else 3
    got = reflex.multi_scale_attention(*(backend.asarray(a) for a in (q, k, v)), head_windows=windows,
                                       alignment=alignment, implementation=implementation, return_lse=True)
    ref = reflex.full_attention(q, k, v, mask=bands(windows, 7, 10, offset), return_lse=True)
    assert max_abs(backend.to_numpy(got[0]), ref[0]) <= 1e-13 and max_abs(backend.to_numpy(got[1]), ref[1]) <= 1e-13
    pattern = reflex.get("multi_scale").pattern(q, k, v, head_windows=windows, alignment=alignment)
    assert numpy.array_equal(pattern, numpy.broadcast_to(bands(windows, 7, 10, offset), (2, 4, 7, 10)))


@given(length=st.integers(1, 6), key_length=st.integers(1, 6), extra=st.integers(0, 3))
def test_windows_covering_the_keys_are_full(length, key_length, extra):
    q, k, v = qkv_host(1, length=length, key_length=key_length)
    w = max(length, key_length) + extra
    got = reflex.multi_scale_attention(q, k, v, head_windows=[w, (w, w + 1), (-1, w), -1])
    assert max_abs(got, reflex.full_attention(q, k, v)) == 0.0


def test_each_head_is_sliding_window():
    if not hasattr(reflex, "sliding_window_attention"):
        pytest.skip("sliding_window is not registered in this checkout")
    q, k, v = qkv_host(2, length=6, key_length=9, kv_heads=2)
    windows = [(1, 1), (3, 0), (0, 2), (-1, 0)]
    got = reflex.multi_scale_attention(q, k, v, head_windows=windows, alignment="bottom_right")
    for h, w in enumerate(windows):
        g = h // 2
        one = reflex.sliding_window_attention(q[:, h:h + 1], k[:, g:g + 1], v[:, g:g + 1], window=w, alignment="bottom_right")
        assert max_abs(got[:, h:h + 1], one) <= 1e-13


def test_empty_window_rows_and_errors():
    q, k, v = qkv_host(3, length=4, key_length=2)
    out, lse = reflex.multi_scale_attention(q, k, v, head_windows=[0, 0, 0, 0], return_lse=True)
    assert numpy.all(out[..., 2:, :] == 0) and numpy.all(lse[..., 2:] == -numpy.inf)
    with pytest.raises(ValueError, match="one window per head"):
        reflex.multi_scale_attention(q, k, v, head_windows=[1, 2])
    with pytest.raises(ValueError, match="window must be"):
        reflex.multi_scale_attention(q, k, v, head_windows=[1, 2, 3, -2])
