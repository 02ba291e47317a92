"""indexer_topk_attention: indexer scores by hand, full attention restricted to the selection, limits."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def indexer_inputs(seed, L=7, S=10, J=3, DI=4):
    return (random.normal((2, J, L, DI), seed=(seed, 5)), random.normal((2, S, DI), seed=(seed, 6)),
            random.normal((2, J, L), seed=(seed, 7)))


def host_selection(iq, ik, iw, top_k, causal=False):
    score = numpy.einsum("bjl,bjls->bls", iw, numpy.maximum(numpy.einsum("bjld,bsd->bjls", iq, ik), 0))
    L, S = score.shape[-2:]
    if causal:
        offset = 0 if causal in (True, "top_left") else S - L
        score = numpy.where(numpy.arange(S)[None, :] <= numpy.arange(L)[:, None] + offset, score, -numpy.inf)
    order = numpy.argsort(-score, axis=-1, kind="stable")[..., :top_k]
    allowed = numpy.zeros(score.shape, dtype=bool)
    numpy.put_along_axis(allowed, order, True, axis=-1)
    return (allowed & numpy.isfinite(score))[:, None], score


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_equals_full_restricted_on_every_backend(backend, causal):
    q, k, v = qkv_host(1, length=7, key_length=10)
    iq, ik, iw = indexer_inputs(1)
    args = [backend.asarray(a) for a in (q, k, v, iq, ik, iw)]
    out, lse = reflex.indexer_topk_attention(*args, top_k=4, causal=causal, return_lse=True)
    pattern, score = host_selection(iq, ik, iw, 4, causal)
    assert max_abs(backend.to_numpy(reflex.indexer_scores(*args[3:])), numpy.einsum(
        "bjl,bjls->bls", iw, numpy.maximum(numpy.einsum("bjld,bsd->bjls", iq, ik), 0))) <= 1e-13
    numpy.testing.assert_array_equal(reflex.get("indexer_topk").pattern(q, k, v, iq, ik, iw, top_k=4, causal=causal),
                                     numpy.broadcast_to(pattern, (2, 1, 7, 10)))
    ref, ref_lse = reflex.full_attention(q, k, v, mask=pattern, return_lse=True)
    assert max_abs(backend.to_numpy(out), ref) <= 1e-13 and max_abs(backend.to_numpy(lse), ref_lse) <= 1e-13


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_top_k_at_least_S_equals_full(causal):
    q, k, v = qkv_host(2, length=7, key_length=10)
    iq, ik, iw = indexer_inputs(2)
    a = reflex.indexer_topk_attention(q, k, v, iq, ik, iw, top_k=10, causal=causal, return_lse=True)
    b = reflex.full_attention(q, k, v, causal=causal, return_lse=True)
    assert max_abs(a[0], b[0]) <= 1e-14 and max_abs(a[1], b[1]) <= 1e-13


def test_ties_to_lower_index_and_relu():
    q, k, v = qkv_host(3, length=7, key_length=10)
    iq, ik, iw = indexer_inputs(3)
    idx = reflex.indexer_topk_indices(q, k, -numpy.abs(iq), numpy.abs(ik), numpy.abs(iw), top_k=3)
    numpy.testing.assert_array_equal(idx, numpy.broadcast_to([0, 1, 2], (2, 1, 7, 3)))  # ReLU → all zero: first keys


def test_gather_equals_dense_and_edges():
    q, k, v = qkv_host(4, length=7, key_length=10)
    iq, ik, iw = indexer_inputs(4)
    for top_k in (1, 3, 15):
        a = reflex.indexer_topk_attention(q, k, v, iq, ik, iw, top_k=top_k, causal=True, return_lse=True)
        b = reflex.indexer_topk_attention(q, k, v, iq, ik, iw, top_k=top_k, causal=True, return_lse=True,
                                          implementation="dense")
        assert max_abs(a[0], b[0]) <= 1e-13 and max_abs(a[1], b[1]) <= 1e-13
    q, k, v = qkv_host(5, length=1, key_length=1)
    iq, ik, iw = indexer_inputs(5, L=1, S=1)
    assert max_abs(reflex.indexer_topk_attention(q, k, v, iq, ik, iw, top_k=2), numpy.repeat(v, 2, axis=-3)) <= 1e-15


def test_errors():
    q, k, v = qkv_host(6, length=7, key_length=10)
    iq, ik, iw = indexer_inputs(6)
    with pytest.raises(ValueError, match=r"index_w must have shape \(\.\.\., J, L\) = \(2, 3, 7\)"):
        reflex.indexer_topk_attention(q, k, v, iq, ik, iw[..., :3], top_k=2)
    with pytest.raises(ValueError, match="must match q's batch"):
        reflex.indexer_topk_attention(q, k, v, iq, ik[:, :4], iw, top_k=2)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        reflex.indexer_topk_attention(q, k, v, iq, ik, iw, top_k=0)
