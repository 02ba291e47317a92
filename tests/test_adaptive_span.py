"""adaptive_span_attention: multiply-and-renormalise == full with bias log m; a covering span == full."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from tests.helpers import max_abs, qkv_host


def soft_mask(spans, ramp, length, key_length, offset, causal=True):
    x = (numpy.arange(length)[:, None] + offset - numpy.arange(key_length)[None, :]).astype(float)
    if not causal:
        x = numpy.abs(x)
    m = numpy.clip((ramp + numpy.reshape(spans, (-1, 1, 1)) - x) / ramp, 0, 1)
    return m * (x >= 0) if causal else m


def multiply_and_renormalise(q, k, v, m):
    """The paper's form on the host: softmax weights times m, renormalised."""
    r = q.shape[-3] // k.shape[-3]
    k, v = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    s = q @ numpy.swapaxes(k, -1, -2) / numpy.sqrt(q.shape[-1])
    w = numpy.exp(s - s.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True) * m
    return (w / w.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
@pytest.mark.parametrize("causal", ["bottom_right", "top_left", False])
def test_equals_full_with_log_mask_bias(backend, implementation, causal, small_tiles):
    q, k, v = qkv_host(0, length=6, key_length=11)
    spans, ramp = numpy.array([0.0, 1.5, 3.0, 20.0]), 2.5
    offset = 11 - 6 if causal == "bottom_right" else 0
    m = soft_mask(spans, ramp, 6, 11, offset, causal=bool(causal))
    with numpy.errstate(divide="ignore"):
        bias = numpy.log(m)  # -inf where m = 0
    got = reflex.adaptive_span_attention(*(backend.asarray(a) for a in (q, k, v)), spans=backend.asarray(spans),
                                         ramp=ramp, causal=causal, implementation=implementation, return_lse=True)
    ref = reflex.full_attention(q, k, v, bias=bias, return_lse=True)
    assert max_abs(backend.to_numpy(got[0]), ref[0]) <= 1e-13 and max_abs(backend.to_numpy(got[1]), ref[1]) <= 1e-13
    assert max_abs(backend.to_numpy(got[0]), multiply_and_renormalise(q, k, v, m)) <= 1e-13


@given(spans=st.lists(st.floats(0.0, 12.0), min_size=4, max_size=4), ramp=st.floats(0.5, 8.0),
       length=st.integers(1, 6), extra=st.integers(0, 4))
def test_multiply_and_renormalise_sweep(spans, ramp, length, extra):
    q, k, v = qkv_host(1, length=length, key_length=length + extra)
    m = soft_mask(numpy.array(spans), ramp, length, length + extra, extra)
    got = reflex.adaptive_span_attention(q, k, v, spans=spans, ramp=ramp)
    assert max_abs(got, multiply_and_renormalise(q, k, v, m)) <= 1e-13


def test_covering_span_is_full(backend):
    q, k, v = qkv_host(2, length=5, key_length=8)
    args = [backend.asarray(a) for a in (q, k, v)]
    got = reflex.adaptive_span_attention(*args, spans=8.0, ramp=32.0)
    assert max_abs(backend.to_numpy(got), backend.to_numpy(reflex.full_attention(*args, causal="bottom_right"))) == 0.0
    sym = reflex.adaptive_span_attention(*args, spans=[8, 9, 10, 11], ramp=1.0, causal=False)
    assert max_abs(backend.to_numpy(sym), backend.to_numpy(reflex.full_attention(*args))) == 0.0


def test_zero_span_is_self_only_and_errors():
    q, k, v = qkv_host(3, length=4, key_length=4, kv_heads=4)
    tiny = reflex.adaptive_span_attention(q, k, v, spans=0.0, ramp=0.5, causal=True)
    assert max_abs(tiny, v) == 0.0  # only x = 0 has m > 0
    with pytest.raises(ValueError, match="ramp must be"):
        reflex.adaptive_span_attention(q, k, v, spans=1.0, ramp=0)
    with pytest.raises(ValueError, match="one span per head"):
        reflex.adaptive_span_attention(q, k, v, spans=[1.0, 2.0])
