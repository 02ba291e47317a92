"""residual_attention: equals full with prev_scores as bias; the raw scores chain through layers."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


@pytest.mark.parametrize("causal", [False, "top_left"])
def test_equals_full_with_prev_as_bias(backend, causal):
    q, k, v = qkv_host(0, length=5, key_length=8)
    prev = random.normal((2, 4, 5, 8), seed=3)
    out, scores, lse = reflex.residual_attention(*(backend.asarray(a) for a in (q, k, v)),
                                                 prev_scores=backend.asarray(prev), causal=causal, return_lse=True)
    ref_out, ref_lse = reflex.full_attention(q, k, v, bias=prev, causal=causal, return_lse=True)
    assert max_abs(backend.to_numpy(out), ref_out) <= 1e-13 and max_abs(backend.to_numpy(lse), ref_lse) <= 1e-13
    raw = numpy.repeat(q, 1, axis=-3) @ numpy.swapaxes(numpy.repeat(k, 2, axis=-3), -1, -2) / numpy.sqrt(5)
    assert max_abs(backend.to_numpy(scores), raw + prev) <= 1e-13


def test_first_layer_is_full_and_scores_chain():
    """Three layers: layer l's returned raw scores feed layer l+1, which equals full with their sum as bias."""
    q, k, v = qkv_host(1, length=4, key_length=4, kv_heads=4)
    out0, s0 = reflex.residual_attention(q, k, v, mask=numpy.tri(4, dtype=bool))
    assert max_abs(out0, reflex.full_attention(q, k, v, mask=numpy.tri(4, dtype=bool))) <= 1e-13
    total = s0
    layers = [qkv_host(10 + i, length=4, key_length=4, kv_heads=4) for i in range(2)]
    prev = s0
    for ql, kl, vl in layers:
        out, prev = reflex.residual_attention(ql, kl, vl, prev_scores=prev, causal=True)
        assert max_abs(out, reflex.full_attention(ql, kl, vl, bias=total, causal=True)) <= 1e-13
        total = total + ql @ numpy.swapaxes(kl, -1, -2) / numpy.sqrt(5)
        assert max_abs(prev, total) <= 1e-13


def test_edges_and_errors():
    q, k, v = qkv_host(2, length=1, key_length=1)
    out, scores = reflex.residual_attention(q, k, v)
    assert scores.shape == (2, 4, 1, 1) and max_abs(out, numpy.repeat(v, 2, axis=-3)) <= 1e-15
    with pytest.raises(ValueError, match="prev_scores of shape"):
        reflex.residual_attention(q, k, v, prev_scores=numpy.zeros((3, 1, 1)))
