"""lowrank_band_attention: both modules vs NumPy on every backend, identity limit, errors."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host
from tests.test_poolingformer import band, softmax_attend


@pytest.mark.parametrize("window", [(1, 1), (2, 0), (0, 0)])
@pytest.mark.parametrize("two_projections", [False, True])
def test_matches_formula_on_every_backend(backend, window, two_projections):
    q, k, v = qkv_host(1, length=7, key_length=9)
    wq, wk = random.normal((5, 2), seed=2), random.normal((5, 2), seed=3)
    kwargs = {"k_proj": backend.asarray(wk)} if two_projections else {}
    out = reflex.lowrank_band_attention(*(backend.asarray(a) for a in (q, k, v)), q_proj=backend.asarray(wq),
                                        window=window, **kwargs)
    # softmax_attend scales by 1/sqrt(last dim): 1/sqrt(r) on the projected q, k (the default lowrank_scale)
    lowrank = softmax_attend(q @ wq, k @ (wk if two_projections else wq), v)
    expected = lowrank + softmax_attend(q, k, v, band(7, 9, *window))
    assert max_abs(backend.to_numpy(out), expected) < 1e-14


def test_identity_projection_gives_full_plus_band():
    q, k, v = qkv_host(4, length=6, key_length=8)
    out = reflex.lowrank_band_attention(q, k, v, q_proj=numpy.eye(5), window=(1, 2), lowrank_scale=5 ** -0.5)
    expected = reflex.full_attention(q, k, v) + reflex.full_attention(q, k, v, mask=band(6, 8, 1, 2))
    assert max_abs(out, expected) <= 1e-15
    tiled = reflex.lowrank_band_attention(q, k, v, q_proj=numpy.eye(5), window=(1, 2), lowrank_scale=5 ** -0.5,
                                          implementation="tiled")
    assert max_abs(tiled, expected) < 1e-15


def test_errors():
    q, k, v = qkv_host(5)
    with pytest.raises(ValueError, match=r"q_proj must have shape \(D, r\) = \(5, r\)"):
        reflex.lowrank_band_attention(q, k, v, q_proj=numpy.ones((4, 2)), window=(1, 1))
    with pytest.raises(ValueError, match="rank"):
        reflex.lowrank_band_attention(q, k, v, q_proj=numpy.ones((5, 2)), k_proj=numpy.ones((5, 3)), window=(1, 1))
