"""recurrent_memory: segment loop == full with the pattern W == per-offset causal sliding windows."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms.recurrent_memory import segment_memory_pattern
from tests.helpers import max_abs, qkv_host


def window_mask(length, key_length, s, m):
    i, j = numpy.arange(length)[:, None], numpy.arange(key_length)[None, :]
    delta = key_length - length
    return (j <= i + delta) & (j >= delta + (i // s) * s - m)


@pytest.mark.parametrize("s,m", [(3, 2), (1, 0), (4, 0), (2, 7), (20, 3)])
@pytest.mark.parametrize("length,key_length", [(11, 11), (7, 10)])
def test_segments_equal_full_with_the_pattern(backend, s, m, length, key_length):
    q, k, v = qkv_host(1, length=length, key_length=key_length)
    ref, ref_lse = reflex.full_attention(q, k, v, mask=window_mask(length, key_length, s, m), return_lse=True)
    for implementation in ("segments", "dense", "tiled"):
        out, lse = reflex.recurrent_memory_attention(*(backend.asarray(a) for a in (q, k, v)), segment_length=s,
                                                     memory_length=m, return_lse=True, implementation=implementation)
        assert max_abs(backend.to_numpy(out), ref) < 1e-14, implementation
        assert max_abs(backend.to_numpy(lse), ref_lse) < 1e-13, implementation


def test_equals_sliding_window_with_lookback_m_plus_offset_in_segment():
    """Rows at position t of their segment equal causal sliding_window with window (m + t, 0)."""
    q, k, v = qkv_host(2, length=13, key_length=13)
    s, m = 4, 3
    out = reflex.recurrent_memory_attention(q, k, v, segment_length=s, memory_length=m)
    for t in range(s):
        window = reflex.sliding_window_attention(q, k, v, window=(m + t, 0), alignment="bottom_right")
        assert max_abs(out[..., t::s, :], window[..., t::s, :]) < 1e-14


def test_limits():
    q, k, v = qkv_host(3, length=9, key_length=9)
    # memory covering everything before: plain causal attention
    out = reflex.recurrent_memory_attention(q, k, v, segment_length=2, memory_length=9)
    assert max_abs(out, reflex.full_attention(q, k, v, causal=True)) < 1e-14
    # one segment holding every query: plain causal too
    out = reflex.recurrent_memory_attention(q, k, v, segment_length=50, memory_length=0)
    assert max_abs(out, reflex.full_attention(q, k, v, causal=True)) < 1e-14
    # segment 1, memory 0: each query sees only itself
    out = reflex.recurrent_memory_attention(q, k, v, segment_length=1, memory_length=0)
    assert max_abs(out, numpy.repeat(v, 2, axis=-3)) < 1e-15


def test_moderate_length_segments_equal_tiled_engine():
    q, k, v = (random.normal((1, 2048, 8), seed=(4, n)) for n in range(3))
    s, m = 64, 48
    out = reflex.recurrent_memory_attention(q, k, v, segment_length=s, memory_length=m)
    p = _kernels.prepare(q, k, v)
    pattern = segment_memory_pattern(s, m, 0)
    tiled, _ = _kernels.tiled(p, scale=8 ** -0.5, mask=pattern.allowed, tile_active=pattern.tile_active,
                              block_q=100, block_k=37)
    assert max_abs(out, tiled) < 1e-14


def test_registry_pattern():
    q, k, v = qkv_host(5, length=6, key_length=8)
    mask = reflex.get("recurrent_memory").pattern(q, k, v, segment_length=4, memory_length=1)
    assert mask.shape == (2, 4, 6, 8) and numpy.array_equal(mask[0, 0], window_mask(6, 8, 4, 1))


def test_errors():
    q, k, v = qkv_host(6, length=5, key_length=3)
    with pytest.raises(ValueError, match="keys must cover the queries"):
        reflex.recurrent_memory_attention(q, k, v, segment_length=2, memory_length=1)
    with pytest.raises(ValueError, match="segment_length must be an int >= 1"):
        reflex.recurrent_memory_attention(k, k, k, segment_length=0, memory_length=1)
    with pytest.raises(ValueError, match="memory_length must be an int >= 0"):
        reflex.recurrent_memory_attention(k, k, k, segment_length=2, memory_length=-1)
    with pytest.raises(ValueError, match="implementation must be one of"):
        reflex.recurrent_memory_attention(k, k, k, segment_length=2, memory_length=1, implementation="numba")
