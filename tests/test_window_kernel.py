"""The band kernels (vectorised NumPy and its Numba twin) against the array-API engine on the same
inputs (≤ 1e-13). The NumPy kernel also runs with tiny chunks, so that one call spans many chunks,
gathered (not strided) key windows at the edges and per-chunk masks."""

from __future__ import annotations

import contextlib
import importlib

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflex.mechanisms import _kernels
from reflex.mechanisms._patterns import band_pattern, dilated_band_pattern
from tests.helpers import max_abs, qkv_host

band = importlib.import_module("reflex.backends.band")
numba_window = importlib.import_module("reflex.backends.numba_kernels.window")


KERNELS = ["numpy", "numpy-small-chunks", "numba"]


@contextlib.contextmanager
def kernel(name):
    """The band kernel module named ``name`` (``band_attention``, ``range_attention``)."""
    if name == "numba":
        yield numba_window
        return
    saved = band.CHUNK_ELEMENTS
    band.CHUNK_ELEMENTS = 120 if name == "numpy-small-chunks" else saved
    try:
        yield band
    finally:
        band.CHUNK_ELEMENTS = saved


@pytest.fixture(params=KERNELS)
def window(request):
    with kernel(request.param) as module:
        yield module


def engine(q, k, v, allowed, scale):
    p = _kernels.prepare(q, k, v)
    return _kernels.tiled(p, scale=scale, mask=allowed, block_q=7, block_k=5)


@pytest.mark.parametrize("block", [1, 3, 16, 200])
@pytest.mark.parametrize("left,right,offset", [(2, 3, 0), (0, 0, 0), (5, 0, 4), (-1, 1, -3), (4, -1, 2), (-1, -1, 0)])
def test_band_matches_tiled_engine(window, block, left, right, offset):
    q, k, v = qkv_host(1, length=23, key_length=29, heads=4, kv_heads=2)
    out, lse = window.band_attention(q, k, v, left=left, right=right, offset=offset, scale=0.4, block=block)
    ref = engine(q, k, v, band_pattern(left, right, offset).allowed, 0.4)
    assert max_abs(out, ref[0]) <= 1e-13 and max_abs(lse, ref[1]) <= 1e-13


@pytest.mark.parametrize("dilation", [2, 3, 7])
@pytest.mark.parametrize("offset", [0, 3, -2])
def test_dilated_band_matches(window, dilation, offset):
    q, k, v = qkv_host(2, length=20, key_length=25)
    out, lse = window.band_attention(q, k, v, left=2, right=1, offset=offset, dilation=dilation, scale=0.5)
    ref = engine(q, k, v, dilated_band_pattern(2, 1, dilation, offset).allowed, 0.5)
    assert max_abs(out, ref[0]) <= 1e-13 and max_abs(lse, ref[1]) <= 1e-13


def test_extra_keys_and_key_ok(window):
    q, k, v = qkv_host(3, length=17, key_length=17)
    extra = numpy.array([0, 9])
    key_ok = numpy.ones(17, dtype=bool)
    key_ok[extra] = False
    key_ok[4] = False
    out, lse = window.band_attention(q, k, v, left=2, right=2, scale=0.3, key_ok=key_ok, extra=extra, block=4)
    band = band_pattern(2, 2).allowed(numpy.arange(17)[:, None], numpy.arange(17)[None, :])
    mask = (band & key_ok[None, :]) | numpy.isin(numpy.arange(17), extra)[None, :]
    ref = engine(q, k, v, mask, 0.3)
    assert max_abs(out, ref[0]) <= 1e-13 and max_abs(lse, ref[1]) <= 1e-13


def test_range_attention_with_per_row_ranges_and_empty_rows(window):
    q, k, v = qkv_host(4, length=12, key_length=10, batch=(2, 3))
    lo = numpy.array([0, 0, 3, 3, 5, 9, 2, 0, 7, 12, -4, 4])
    hi = numpy.array([0, 4, 2, 8, 5, 20, 9, 9, 6, 15, -1, 4])
    out, lse = window.range_attention(q, k, v, lo, hi, scale=0.7, block=5)
    j = numpy.arange(10)[None, :]
    mask = (j >= lo[:, None]) & (j <= hi[:, None])
    ref = engine(q, k, v, mask, 0.7)
    assert max_abs(out, ref[0]) <= 1e-13 and max_abs(lse, ref[1]) <= 1e-13
    assert numpy.all(out[..., [2, 8, 9, 10], :] == 0) and numpy.all(lse[..., [2, 8, 9, 10]] == -numpy.inf)


def test_empty_inputs_and_inputs_unchanged(window):
    q, k, v = qkv_host(5, length=0, key_length=4)
    out, lse = window.band_attention(q, k, v, left=1, right=1, scale=1.0)
    assert out.shape == (2, 4, 0, 3) and lse.shape == (2, 4, 0)
    q, k, v = qkv_host(5, length=4, key_length=4)
    copies = [a.copy() for a in (q, k, v)]
    window.band_attention(q, k, v, left=1, right=1, scale=1.0)
    for a, b in zip((q, k, v), copies):
        numpy.testing.assert_array_equal(a, b)


@given(length=st.integers(1, 40), key_length=st.integers(1, 40), left=st.integers(-1, 12), right=st.integers(-1, 12),
       offset=st.integers(-10, 10), dilation=st.integers(1, 4), block=st.integers(1, 20))
@pytest.mark.parametrize("name", KERNELS)
def test_hypothesis(name, length, key_length, left, right, offset, dilation, block):
    q, k, v = qkv_host(6, length=length, key_length=key_length, batch=(1,), heads=2, kv_heads=1)
    with kernel(name) as window:
        out, lse = window.band_attention(q, k, v, left=left, right=right, offset=offset, dilation=dilation, scale=0.6,
                                         block=block)
    ref = engine(q, k, v, dilated_band_pattern(left, right, dilation, offset).allowed, 0.6)
    assert max_abs(out, ref[0]) <= 1e-13 and max_abs(lse, ref[1]) <= 1e-13


def test_irregular_ranges_many_tiles(window):
    # Ranges that jump around: tiles of the NumPy kernel gather their key windows (no common stride).
    q, k, v = qkv_host(7, length=60, key_length=200, heads=2, kv_heads=1)
    rng = numpy.random.default_rng(7)
    lo = numpy.sort(rng.integers(-5, 200, size=60))
    hi = lo + rng.integers(-3, 6, size=60)
    out, lse = window.range_attention(q, k, v, lo, hi, scale=0.5, block=2)
    j = numpy.arange(200)[None, :]
    ref = engine(q, k, v, (j >= lo[:, None]) & (j <= hi[:, None]), 0.5)
    assert max_abs(out, ref[0]) <= 1e-13 and max_abs(lse, ref[1]) <= 1e-13
