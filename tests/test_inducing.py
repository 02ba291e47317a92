"""isab / luna attention: two-stage NumPy softmax on every backend, one-point limit, GQA, errors."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def attend(q, k, v):
    s = q @ numpy.swapaxes(k, -1, -2) / numpy.sqrt(q.shape[-1])
    w = numpy.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


def naive(q, k, v, points):
    points = numpy.broadcast_to(points, k.shape[:-2] + points.shape[-2:])
    packed_k, packed_v = attend(points, k, k), attend(points, k, v)
    r = q.shape[-3] // k.shape[-3]
    return attend(q, numpy.repeat(packed_k, r, axis=-3), numpy.repeat(packed_v, r, axis=-3)), packed_k, packed_v


@pytest.mark.parametrize("points_shape", [(3, 5), (2, 3, 5), (2, 2, 1, 5)])
def test_isab_matches_two_stage_softmax_on_every_backend(backend, points_shape):
    q, k, v = qkv_host(1, length=7, key_length=9)
    points = random.normal(points_shape, seed=2)
    out = reflex.isab_attention(*(backend.asarray(a) for a in (q, k, v)), inducing=backend.asarray(points))
    assert max_abs(backend.to_numpy(out), naive(q, k, v, points)[0]) < 1e-14


def test_luna_returns_the_packed_context_on_every_backend(backend):
    q, k, v = qkv_host(3, length=6, key_length=10)
    p = random.normal((2, 2, 4, 5), seed=4)
    out, packed_k, packed_v = reflex.luna_attention(*(backend.asarray(a) for a in (q, k, v)), p=backend.asarray(p),
                                                     return_packed=True)
    expected = naive(q, k, v, p)
    for got, want in zip((out, packed_k, packed_v), expected):
        assert max_abs(backend.to_numpy(got), want) < 1e-14


def test_one_point_gives_every_query_the_packed_value():
    q, k, v = qkv_host(5, length=4, key_length=6)
    point = random.normal((1, 5), seed=6)
    out, lse = reflex.isab_attention(q, k, v, inducing=point, return_lse=True)
    packed_v = attend(numpy.broadcast_to(point, (2, 2, 1, 5)), k, v)
    assert max_abs(out, numpy.broadcast_to(numpy.repeat(packed_v, 2, axis=-3), out.shape)) < 1e-15
    assert numpy.all(numpy.isfinite(lse))


def test_isab_and_luna_agree_and_gqa_equals_repeated_heads():
    q, k, v = qkv_host(7, length=5, key_length=8)
    points = random.normal((3, 5), seed=8)
    isab = reflex.isab_attention(q, k, v, inducing=points)
    assert max_abs(isab, reflex.luna_attention(q, k, v, p=points)) == 0.0
    repeated = [numpy.repeat(a, 2, axis=-3) for a in (k, v)]
    assert max_abs(isab, reflex.isab_attention(q, *repeated, inducing=points)) < 1e-15
    assert max_abs(isab, reflex.isab_attention(q, k, v, inducing=points, implementation="tiled")) < 1e-15


def test_errors():
    q, k, v = qkv_host(9)
    with pytest.raises(ValueError, match=r"inducing must have shape \(\.\.\., m, D\) with D = 5"):
        reflex.isab_attention(q, k, v, inducing=numpy.ones((3, 4)))
    with pytest.raises(ValueError, match="does not broadcast"):
        reflex.luna_attention(q, k, v, p=numpy.ones((3, 3, 5)))
