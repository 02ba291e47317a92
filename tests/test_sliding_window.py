"""sliding_window_attention: every kernel equals full_attention with the band mask, on every backend."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from tests.helpers import max_abs, qkv_host


def band_mask(length, key_length, left, right, offset=0):
    """Independent host construction of the band (the catalogue's definition)."""
    i = numpy.arange(length)[:, None] + offset
    j = numpy.arange(key_length)[None, :]
    ok = numpy.ones((length, key_length), dtype=bool)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def check(backend, q, k, v, implementation, **params):
    args = [backend.asarray(a) for a in (q, k, v)]
    out, lse = reflex.sliding_window_attention(*args, **params, implementation=implementation, return_lse=True)
    length, key_length = q.shape[-2], k.shape[-2]
    offset = key_length - length if params.get("alignment") == "bottom_right" else 0
    mask = band_mask(length, key_length, *params["window"], offset)
    ref_out, ref_lse = reflex.full_attention(q, k, v, mask=mask, return_lse=True, implementation="dense")
    assert max_abs(backend.to_numpy(out), ref_out) <= 1e-13
    assert max_abs(backend.to_numpy(lse), ref_lse) <= 1e-13
    assert backend.to_numpy(out).dtype == numpy.float64


@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled", "gather"])
@pytest.mark.parametrize("window,alignment", [((2, 1), "top_left"), ((3, 0), "bottom_right"), ((-1, 0), "top_left"),
                                              ((0, 0), "top_left"), ((1, -1), "bottom_right")])
def test_equals_full_with_band_mask(backend, implementation, window, alignment):
    q, k, v = qkv_host(1, length=9, key_length=13)
    check(backend, q, k, v, implementation, window=window, alignment=alignment)


@pytest.mark.parametrize("length,key_length,window", [
    (1, 1, (0, 0)), (1, 7, (2, 2)), (7, 1, (2, 2)), (6, 6, (50, 50)), (6, 6, (6, 6)), (5, 9, (0, 0)),
    (9, 5, (2, 0)), (12, 12, (-1, -1)), (130, 140, (7, 3)),
])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("implementation", ["numba", "tiled", "gather"])
def test_edges_numpy(length, key_length, window, alignment, implementation):
    from tests.conftest import make_backend

    q, k, v = qkv_host(2, length=length, key_length=key_length)
    check(make_backend("numpy"), q, k, v, implementation, window=window, alignment=alignment)


def test_fully_masked_rows_give_zero_and_minus_inf():
    # bottom_right with L > S puts the first queries before every key: with right = 0 they see nothing.
    q, k, v = qkv_host(3, length=8, key_length=3)
    for implementation in ("numba", "dense", "tiled", "gather"):
        out, lse = reflex.sliding_window_attention(q, k, v, window=(1, 0), alignment="bottom_right",
                                                   implementation=implementation, return_lse=True)
        assert numpy.all(out[..., :5, :] == 0) and numpy.all(lse[..., :5] == -numpy.inf)
        assert numpy.all(numpy.isfinite(lse[..., 5:]))


def test_window_zero_is_self_only():
    q, k, v = qkv_host(4, length=6, key_length=6, kv_heads=4)
    out = reflex.sliding_window_attention(q, k, v, window=(0, 0))
    assert max_abs(out, v) <= 1e-15


def test_huge_logits_and_gqa_torch_numpy_agree():
    q, k, v = qkv_host(5, length=11, key_length=11, heads=6, kv_heads=2)
    q = q * 1e3
    outs = [reflex.sliding_window_attention(q, k, v, window=(3, 2), implementation=impl, scale=1.0)
            for impl in ("numba", "dense", "tiled", "gather")]
    assert all(numpy.all(numpy.isfinite(o)) for o in outs)
    assert all(max_abs(o, outs[1]) <= 1e-13 for o in outs)


def test_registry_pattern_is_the_band():
    q, k, v = qkv_host(6, length=5, key_length=8)
    pattern = reflex.get("sliding_window").pattern(q, k, v, window=(1, 2), alignment="bottom_right")
    assert pattern.shape == (2, 4, 5, 8) and pattern.dtype == bool
    numpy.testing.assert_array_equal(pattern[0, 0], band_mask(5, 8, 1, 2, 3))


def test_compute_dtype_float32_takes_the_array_api_path():
    q, k, v = qkv_host(7, length=9, key_length=9)
    out = reflex.sliding_window_attention(q, k, v, window=(2, 2), compute_dtype="float32")
    ref = reflex.full_attention(q, k, v, mask=band_mask(9, 9, 2, 2), compute_dtype="float32")
    assert out.dtype == numpy.float32 and max_abs(out, ref) < 1e-6


@given(length=st.integers(1, 24), key_length=st.integers(1, 24), left=st.integers(-1, 30), right=st.integers(-1, 30),
       alignment=st.sampled_from(["top_left", "bottom_right"]), kv_heads=st.sampled_from([1, 2, 4]))
def test_hypothesis_all_kernels(length, key_length, left, right, alignment, kv_heads):
    from tests.conftest import make_backend

    q, k, v = qkv_host(8, length=length, key_length=key_length, kv_heads=kv_heads)
    for implementation in ("numba", "tiled", "gather"):
        check(make_backend("numpy"), q, k, v, implementation, window=(left, right), alignment=alignment)


def test_errors():
    q, k, v = qkv_host(9)
    with pytest.raises(ValueError, match="window must be"):
        reflex.sliding_window_attention(q, k, v, window=(-2, 1))
    with pytest.raises(ValueError, match="window must be"):
        reflex.sliding_window_attention(q, k, v, window=3)
    with pytest.raises(ValueError, match="alignment must be"):
        reflex.sliding_window_attention(q, k, v, window=(1, 1), alignment="center")
    with pytest.raises(ValueError, match="implementation must be"):
        reflex.sliding_window_attention(q, k, v, window=(1, 1), implementation="flash")
    import array_api_strict

    args = [array_api_strict.asarray(a) for a in (q, k, v)]
    with pytest.raises(ValueError, match="numba"):
        reflex.sliding_window_attention(*args, window=(1, 1), implementation="numba")
