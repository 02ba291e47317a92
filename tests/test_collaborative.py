"""collaborative_attention: one-hot block mixing == standard multi-head; == explicit scores Q diag(m) Kᵀ."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs


def test_one_hot_mixing_is_standard_multi_head(backend):
    heads, d = 4, 3
    q, k = random.normal((2, 5, heads * d), seed=0), random.normal((2, 7, heads * d), seed=1)
    v = random.normal((2, heads, 7, 2), seed=2)
    mixing = numpy.kron(numpy.eye(heads), numpy.ones((1, d)))  # m_h = indicator of columns [h·d, (h+1)·d)
    got = reflex.collaborative_attention(*(backend.asarray(a) for a in (q, k, v)), mixing=backend.asarray(mixing),
                                         scale=1 / numpy.sqrt(d), causal=True)
    split = lambda a: numpy.moveaxis(a.reshape(*a.shape[:-1], heads, d), -2, -3)  # noqa: E731
    ref = reflex.full_attention(split(q), split(k), v, causal=True)
    assert max_abs(backend.to_numpy(got), ref) <= 1e-13


def test_general_mixing_equals_full_with_explicit_scores(backend):
    q, k = random.normal((3, 4, 6), seed=3), random.normal((3, 5, 6), seed=4)
    v = random.normal((3, 2, 5, 3), seed=5)
    mixing = random.normal((4, 6), seed=6)
    out, lse = reflex.collaborative_attention(*(backend.asarray(a) for a in (q, k, v)), mixing=backend.asarray(mixing),
                                              return_lse=True)
    scores = numpy.einsum("bld,hd,bsd->bhls", q, mixing, k) / numpy.sqrt(6)
    zeros_q, zeros_k = numpy.zeros((3, 4, 4, 1)), numpy.zeros((3, 2, 5, 1))
    ref_out, ref_lse = reflex.full_attention(zeros_q, zeros_k, v, bias=scores, return_lse=True)
    assert max_abs(backend.to_numpy(out), ref_out) <= 1e-13 and max_abs(backend.to_numpy(lse), ref_lse) <= 1e-13


def test_unbatched_single_key_and_errors():
    q, k, v = random.normal((3, 4), seed=0), random.normal((1, 4), seed=1), random.normal((2, 1, 3), seed=2)
    out = reflex.collaborative_attention(q, k, v, mixing=random.normal((2, 4), seed=3))
    assert max_abs(out, numpy.broadcast_to(v, (2, 3, 3))) <= 1e-15
    with pytest.raises(ValueError, match="mixing must have shape"):
        reflex.collaborative_attention(q, k, v, mixing=numpy.ones((2, 3)))
    with pytest.raises(ValueError, match="k has 2 heads; q has 3"):
        reflex.collaborative_attention(q, k, v, mixing=numpy.ones((3, 4)))


def test_float32_inputs_are_computed_in_float64():
    """The product Q~ ⊙ m_h runs in the compute dtype: float32 inputs give the float64 result of their values."""
    q, k = random.normal((2, 5, 6), seed=7), random.normal((2, 7, 6), seed=8)
    v, mixing = random.normal((2, 2, 7, 3), seed=9), random.normal((4, 6), seed=10)
    low = [a.astype(numpy.float32) for a in (q, k, v, mixing)]
    got = reflex.collaborative_attention(*low[:3], mixing=low[3])
    ref = reflex.collaborative_attention(*(a.astype(numpy.float64) for a in low[:3]), mixing=low[3].astype(numpy.float64))
    assert got.dtype == numpy.float64 and max_abs(got, ref) == 0.0
