"""average_attention: the cumulative mean before the gate; recurrent == parallel; gate algebra; FFN."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs


def host(x, w, b, ffn=None, causal=True):
    avg = numpy.cumsum(x, axis=-2) / numpy.arange(1, x.shape[-2] + 1)[:, None] if causal else \
        numpy.broadcast_to(x.mean(-2, keepdims=True), x.shape)
    g = avg
    if ffn is not None:
        w1, b1, w2, b2 = ffn
        g = numpy.maximum(g @ w1 + b1, 0) @ w2 + b2
    z = numpy.concatenate([x, g], axis=-1) @ w + b
    s = 1 / (1 + numpy.exp(-z))
    n = x.shape[-1]
    return s[..., :n] * x + s[..., n:] * g, avg


@pytest.mark.parametrize("causal", [True, False])
def test_matches_host_formula_and_returns_the_average(backend, causal):
    x, w, b = random.normal((2, 6, 4), seed=0), random.normal((8, 8), seed=1), random.normal((8,), seed=2)
    ffn = (random.normal((4, 5), seed=3), random.normal((5,), seed=4), random.normal((5, 4), seed=5), random.normal((4,), seed=6))
    names = ("w_ffn_in", "b_ffn_in", "w_ffn_out", "b_ffn_out")
    out, avg = reflex.average_attention(backend.asarray(x), backend.asarray(w), b_gate=backend.asarray(b), causal=causal,
                                        return_average=True, **{n: backend.asarray(a) for n, a in zip(names, ffn)})
    ref_out, ref_avg = host(x, w, b, ffn, causal=causal)
    assert max_abs(backend.to_numpy(avg), ref_avg) <= 1e-14
    assert max_abs(backend.to_numpy(out), ref_out) <= 1e-13


def test_recurrent_equals_parallel(backend):
    x, w = random.normal((3, 7, 4), seed=7), random.normal((8, 8), seed=8)
    args = (backend.asarray(x), backend.asarray(w))
    par = reflex.average_attention(*args, return_average=True)
    rec = reflex.average_attention(*args, return_average=True, implementation="recurrent")
    assert max_abs(backend.to_numpy(par[1]), backend.to_numpy(rec[1])) <= 1e-15
    assert max_abs(backend.to_numpy(par[0]), backend.to_numpy(rec[0])) <= 1e-15


def test_saturated_gates_select_average_or_input():
    """W = 0 and b = ∓∞ give gates of exactly 0 / 1: the output is the cumulative mean, or x itself."""
    x = random.normal((5, 3), seed=9)
    mean = numpy.cumsum(x, axis=0) / numpy.arange(1, 6)[:, None]
    only_average = numpy.concatenate([numpy.full(3, -numpy.inf), numpy.full(3, numpy.inf)])
    assert max_abs(reflex.average_attention(x, numpy.zeros((6, 6)), b_gate=only_average), mean) <= 1e-15
    assert max_abs(reflex.average_attention(x, numpy.zeros((6, 6)), b_gate=-only_average), x) == 0.0
    first = reflex.average_attention(x[:1], numpy.zeros((6, 6)))  # L = 1: the average is x; gates 1/2 each
    assert max_abs(first, x[:1]) <= 1e-15


def test_errors():
    x = numpy.ones((2, 3))
    with pytest.raises(ValueError, match="w_gate must have shape"):
        reflex.average_attention(x, numpy.ones((3, 3)))
    with pytest.raises(ValueError, match="both w_ffn_in and w_ffn_out"):
        reflex.average_attention(x, numpy.ones((6, 6)), w_ffn_in=numpy.ones((3, 2)))
    with pytest.raises(ValueError, match="implementation must be"):
        reflex.average_attention(x, numpy.ones((6, 6)), implementation="scan")
