"""synthesizer_attention: random with R = scale·QKᵀ == full; each variant == its host formula."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def softmax_out(scores, v, causal=False):
    v = numpy.repeat(v, scores.shape[-3] // v.shape[-3], axis=-3)
    if causal:
        scores = numpy.where(numpy.tri(scores.shape[-2], scores.shape[-1], dtype=bool), scores, -numpy.inf)
    e = numpy.exp(scores - scores.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("causal", [False, "top_left"])
def test_random_with_dot_product_scores_is_full(backend, causal):
    q, k, v = qkv_host(0, length=5, key_length=7)
    r = numpy.repeat(q, 1, axis=-3) @ numpy.swapaxes(numpy.repeat(k, 2, axis=-3), -1, -2) / numpy.sqrt(5)
    got = reflex.synthesizer_attention(backend.asarray(v), variant="random", random_matrix=backend.asarray(r),
                                       causal=causal, return_lse=True)
    ref = reflex.full_attention(q, k, v, causal=causal, return_lse=True)
    assert max_abs(backend.to_numpy(got[0]), ref[0]) <= 1e-13 and max_abs(backend.to_numpy(got[1]), ref[1]) <= 1e-13


def test_dense_variant(backend):
    x, v = random.normal((2, 4, 6), seed=1), random.normal((2, 1, 4, 3), seed=2)
    w1, b1 = random.normal((2, 6, 5), seed=3), random.normal((2, 5), seed=4)
    w2, b2 = random.normal((2, 5, 4), seed=5), random.normal((2, 4), seed=6)
    got = reflex.synthesizer_attention(*(backend.asarray(a) for a in (v,)), variant="dense",
                                       **{n: backend.asarray(a) for n, a in dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2).items()})
    hidden = numpy.maximum(numpy.einsum("bln,hnf->bhlf", x, w1) + b1[:, None, :], 0)
    scores = numpy.einsum("bhlf,hfs->bhls", hidden, w2) + b2[:, None, :]
    assert max_abs(backend.to_numpy(got), softmax_out(scores, v)) <= 1e-13
    no_bias = reflex.synthesizer_attention(v, variant="dense", x=x, w1=w1, w2=w2, causal=True)
    scores = numpy.maximum(numpy.einsum("bln,hnf->bhlf", x, w1), 0) @ w2
    assert max_abs(no_bias, softmax_out(scores, v, causal=True)) <= 1e-13


def test_factorized_variants(backend):
    v = random.normal((1, 2, 6, 3), seed=1)
    r1, r2 = random.normal((2, 5, 2), seed=2), random.normal((2, 6, 2), seed=3)
    got = reflex.synthesizer_attention(backend.asarray(v), variant="factorized_random", r1=backend.asarray(r1), r2=backend.asarray(r2))
    assert max_abs(backend.to_numpy(got), softmax_out(r1 @ numpy.swapaxes(r2, -1, -2), v)) <= 1e-13
    x = random.normal((1, 5, 4), seed=4)
    w_a, w_b = random.normal((2, 4, 2), seed=5), random.normal((2, 4, 3), seed=6)
    a, b = numpy.einsum("bln,hna->bhla", x, w_a), numpy.einsum("zln,hnc->zhlc", x, w_b)
    for tiling, c in (("outer", numpy.repeat(a, 3, axis=-1) * numpy.tile(b, 2)),
                      ("tile", numpy.tile(a, 3) * numpy.tile(b, 2))):
        got = reflex.synthesizer_attention(backend.asarray(v), variant="factorized_dense", x=backend.asarray(x),
                                           w_a=backend.asarray(w_a), w_b=backend.asarray(w_b), tiling=tiling)
        assert max_abs(backend.to_numpy(got), softmax_out(c, v)) <= 1e-13


def test_scores_ignore_values_and_errors():
    v = random.normal((2, 3, 1), seed=0)  # unbatched: G = 2, S = 3
    r = numpy.zeros((2, 4, 3))
    assert max_abs(reflex.synthesizer_attention(v, random_matrix=r), numpy.repeat(v.mean(-2, keepdims=True), 4, axis=-2)) <= 1e-15
    with pytest.raises(ValueError, match="variant must be"):
        reflex.synthesizer_attention(v, variant="mixture", random_matrix=r)
    with pytest.raises(ValueError, match="random_matrix is required"):
        reflex.synthesizer_attention(v)
    with pytest.raises(ValueError, match="a·b"):
        reflex.synthesizer_attention(v, variant="factorized_dense", x=numpy.ones((4, 2)), w_a=numpy.ones((2, 2, 2)),
                                     w_b=numpy.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="5 key columns"):
        reflex.synthesizer_attention(v, random_matrix=numpy.zeros((2, 4, 5)))
