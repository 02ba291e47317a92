"""talking_heads_attention: identity mixing == full; == the paper's einsum pseudo-code; masks; shapes."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def einsum_reference(q, k, v, p_l, p_w, mask=None):
    """Shazeer et al. 2020 pseudo-code on the host (kv heads repeated for GQA)."""
    k = numpy.repeat(k, q.shape[-3] // k.shape[-3], axis=-3)
    logits = numpy.einsum("...hid,...hjd->...hij", q, k) / numpy.sqrt(q.shape[-1])
    logits = numpy.einsum("...hij,hm->...mij", logits, p_l)
    if mask is not None:
        logits = numpy.where(mask, logits, -numpy.inf)
    m = logits.max(-1, keepdims=True)
    w = numpy.exp(logits - numpy.where(numpy.isfinite(m), m, 0))
    total = w.sum(-1, keepdims=True)
    w = numpy.where(total > 0, w / numpy.where(total > 0, total, 1), 0)
    w = numpy.einsum("...mij,mu->...uij", w, p_w)
    return numpy.einsum("...uij,...uje->...uie", w, v)


def test_identity_mixing_is_full(backend):
    q, k, v = qkv_host(0, length=5, key_length=7, kv_heads=4)
    eye = numpy.eye(4)
    args = [backend.asarray(a) for a in (q, k, v)]
    got = reflex.talking_heads_attention(*args, p_logits=backend.asarray(eye), p_weights=backend.asarray(eye), causal=True)
    assert max_abs(backend.to_numpy(got), reflex.full_attention(q, k, v, causal=True)) <= 1e-13


def test_rectangular_mixing_matches_pseudo_code(backend):
    q, k, _ = qkv_host(1, length=4, key_length=6, kv_heads=2)
    v = random.normal((2, 3, 6, 5), seed=9)
    p_l, p_w = random.normal((4, 6), seed=2), random.normal((6, 3), seed=3)
    mask = random.uniform((2, 6, 4, 6), seed=4) < 0.6
    mask[0, 1, 2, :] = False  # a fully masked row of one mixed head: its weights are 0
    got = reflex.talking_heads_attention(*(backend.asarray(a) for a in (q, k, v)), p_logits=backend.asarray(p_l),
                                         p_weights=backend.asarray(p_w), mask=backend.asarray(mask))
    got = backend.to_numpy(got)
    assert got.shape == (2, 3, 4, 5)
    assert max_abs(got, einsum_reference(q, k, v, p_l, p_w, mask)) <= 1e-13


def test_post_softmax_mixing_only_and_single_key():
    q, k, v = qkv_host(2, length=3, key_length=1, kv_heads=4)
    p_w = random.normal((4, 4), seed=5)
    got = reflex.talking_heads_attention(q, k, v, p_logits=numpy.eye(4), p_weights=p_w)
    # one key: every softmax weight is 1, so head u outputs (Σ_m P_w[m, u])·v_u
    assert max_abs(got, p_w.sum(0)[:, None, None] * numpy.broadcast_to(v, (2, 4, 3, v.shape[-1]))) <= 1e-14


def test_errors():
    q, k, v = qkv_host(3, length=3, key_length=4, kv_heads=4)
    with pytest.raises(ValueError, match="p_logits must have shape"):
        reflex.talking_heads_attention(q, k, v, p_logits=numpy.eye(3), p_weights=numpy.eye(4))
    with pytest.raises(ValueError, match="p_weights must have shape"):
        reflex.talking_heads_attention(q, k, v, p_logits=numpy.ones((4, 2)), p_weights=numpy.eye(4))
    with pytest.raises(ValueError, match="v must have shape"):
        reflex.talking_heads_attention(q, k, v, p_logits=numpy.eye(4), p_weights=numpy.ones((4, 2)))
