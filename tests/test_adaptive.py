"""adaptive_attention: kept keys by hand, full attention restricted to gate ∪ band, limits, edges."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def host_pattern(importance, keep, L, S, window=None, causal=False):
    count = max(1, math.ceil(Fraction(str(keep)) * S))  # exact: keep as the decimal it is written as
    order = numpy.argsort(-importance, axis=-1, kind="stable")[..., :count]
    kept = numpy.zeros(importance.shape, bool)
    numpy.put_along_axis(kept, order, True, axis=-1)
    allowed = numpy.broadcast_to(kept[..., None, :], (*kept.shape[:-1], L, S)).copy()
    offset = S - L if causal == "bottom_right" else 0
    rel = numpy.arange(S)[None, :] - numpy.arange(L)[:, None] - offset
    if window is not None:
        allowed |= (rel >= -window[0]) & (rel <= window[1])
    if causal:
        allowed &= rel <= 0
    return allowed


@pytest.mark.parametrize("window,causal", [(None, False), ((1, 1), False), ((2, 0), "top_left"), ((1, 0), "bottom_right")])
def test_equals_full_restricted_on_every_backend(backend, window, causal):
    q, k, v = qkv_host(1, length=7, key_length=10)
    importance = random.uniform((2, 4, 10), seed=2)
    out, lse = reflex.adaptive_attention(*(backend.asarray(a) for a in (q, k, v, importance)), keep=0.3, window=window,
                                         causal=causal, return_lse=True)
    pattern = host_pattern(importance, 0.3, 7, 10, window, causal)
    numpy.testing.assert_array_equal(reflex.get("adaptive").pattern(q, k, v, importance, keep=0.3, window=window,
                                                                    causal=causal), pattern)
    ref, ref_lse = reflex.full_attention(q, k, v, mask=pattern, return_lse=True)
    assert max_abs(backend.to_numpy(out), ref) <= 1e-13 and max_abs(backend.to_numpy(lse), ref_lse) <= 1e-13


def test_keep_everything_equals_full_and_ties():
    q, k, v = qkv_host(3, length=5, key_length=8)
    importance = numpy.zeros(8)  # all tied: the first ceil(keep·S) keys
    for causal in (False, "top_left"):
        assert max_abs(reflex.adaptive_attention(q, k, v, importance, keep=1.0, causal=causal),
                       reflex.full_attention(q, k, v, causal=causal)) <= 1e-14
    kept = reflex.adaptive_keys(q, k, importance, keep=0.25)
    numpy.testing.assert_array_equal(kept.reshape(-1), [True, True] + [False] * 6)
    tiled = reflex.adaptive_attention(q, k, v, importance, keep=0.25, window=(1, 0), causal=True, implementation="tiled")
    dense = reflex.adaptive_attention(q, k, v, importance, keep=0.25, window=(1, 0), causal=True, implementation="dense")
    assert max_abs(tiled, dense) <= 1e-14


def test_kept_count_is_exact_ceiling_of_the_decimal_fraction():
    """⌈keep·S⌉ in exact arithmetic: float 0.07 * 100 = 7.000000000000001 and 0.28 * 25 = 7.000000000000001."""
    for keep, S, want in ((0.07, 100, 7), (0.28, 25, 7), (0.14, 50, 7), (0.3, 10, 3), (0.31, 10, 4), (0.001, 10, 1)):
        q, k, _ = qkv_host(6, length=2, key_length=S)
        kept = reflex.adaptive_keys(q, k, random.uniform((S,), seed=7), keep=keep)
        assert int(numpy.sum(kept)) == want, (keep, S)


def test_edges_and_errors():
    q, k, v = qkv_host(4, length=1, key_length=1)
    assert max_abs(reflex.adaptive_attention(q, k, v, numpy.ones(1), keep=0.1), numpy.repeat(v, 2, axis=-3)) <= 1e-15
    q, k, v = qkv_host(5)
    with pytest.raises(ValueError, match=r"keep must be a fraction in \(0, 1\]"):
        reflex.adaptive_attention(q, k, v, numpy.ones(9), keep=0)
    with pytest.raises(ValueError, match="does not broadcast to"):
        reflex.adaptive_attention(q, k, v, numpy.ones(8), keep=0.5)
    with pytest.raises(ValueError, match="window must be"):
        reflex.adaptive_attention(q, k, v, numpy.ones(9), keep=0.5, window=(1,))
