"""xl_relative: the four terms against a textbook loop, reductions to full, the sinusoid formula."""

from __future__ import annotations

import math

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def xl_by_hand(q, k, v, w_r, u, v_bias, *, causal=True, scale=None):
    """A_ij = q·k + q·W_R R_{i+M−j} + u·k + v·W_R R_{i+M−j}, one (i, j) at a time (Dai et al. §3.3)."""
    heads, length, dim = q.shape[-3:]
    key_length = k.shape[-2]
    memory = key_length - length
    r = heads // k.shape[-3]
    k, v = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    width = w_r.shape[-1]
    scale = 1 / math.sqrt(dim) if scale is None else scale
    s = numpy.empty((*q.shape[:-1], key_length))
    for i in range(length):
        for j in range(key_length):
            delta = i + memory - j
            sinusoid = numpy.array([math.sin(delta / 10000 ** (2 * t / width)) for t in range(width // 2)]
                                   + [math.cos(delta / 10000 ** (2 * t / width)) for t in range(width // 2)])
            rel = w_r @ sinusoid  # (H, D)
            s[..., i, j] = scale * ((q[..., i, :] + u) * k[..., j, :] + (q[..., i, :] + v_bias) * rel).sum(-1)
            if causal and j > i + memory:
                s[..., i, j] = -numpy.inf
    w = numpy.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


def weights(seed, heads=4, dim=5, width=6):
    return (random.normal((heads, dim, width), seed=(seed, 1), std=0.4), random.normal((heads, dim), seed=(seed, 2)),
            random.normal((heads, dim), seed=(seed, 3)))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_matches_textbook(backend, causal, implementation):
    q, k, v = qkv_host(1, length=4, key_length=9)
    w_r, u, vb = weights(1)
    ref = xl_by_hand(q, k, v, w_r, u, vb, causal=causal)
    out = reflex.xl_relative_attention(*(backend.asarray(a) for a in (q, k, v)), w_r=backend.asarray(w_r),
                                       content_bias=backend.asarray(u), position_bias=backend.asarray(vb),
                                       causal="bottom_right" if causal else False, implementation=implementation)
    assert max_abs(backend.to_numpy(out), ref) < 1e-14


def test_zero_u_v_r_is_full_over_memory_and_current(backend):
    q, k, v = qkv_host(2, length=5, key_length=12)
    zeros = (numpy.zeros((4, 5, 8)), numpy.zeros((4, 5)), numpy.zeros((4, 5)))
    out, lse = reflex.xl_relative_attention(*(backend.asarray(a) for a in (q, k, v)),
                                            **dict(zip(("w_r", "content_bias", "position_bias"), map(backend.asarray, zeros))),
                                            return_lse=True)
    ref, ref_lse = reflex.full_attention(q, k, v, causal="bottom_right", return_lse=True)
    assert max_abs(backend.to_numpy(out), ref) < 1e-15 and max_abs(backend.to_numpy(lse), ref_lse) < 1e-14
    # the content bias alone is a per-key bias u·k_j: equals full with that bias
    u = random.normal((4, 5), seed=3)
    out = reflex.xl_relative_attention(q, k, v, w_r=zeros[0], content_bias=u, position_bias=zeros[2])
    bias = numpy.einsum("hd,bhsd->bhs", u, numpy.repeat(k, 2, axis=1))[..., None, :] / math.sqrt(5)
    assert max_abs(out, reflex.full_attention(q, k, v, bias=bias, causal="bottom_right")) < 1e-15


def test_sinusoid_matches_the_paper_formula():
    distances = numpy.array([-7, 0, 1, 5, 1000, 65535])
    got = reflex.relative_sinusoid(distances, 8)
    for n, delta in enumerate(distances.tolist()):
        for t in range(4):  # Vaswani et al. §3.5: sin(pos / 10000^(2t/d)), cos(pos / 10000^(2t/d))
            assert abs(got[n, t] - math.sin(delta / 10000 ** (2 * t / 8))) < 1e-15 * max(1, abs(delta))
            assert abs(got[n, 4 + t] - math.cos(delta / 10000 ** (2 * t / 8))) < 1e-15 * max(1, abs(delta))
    assert numpy.array_equal(got[1], [0, 0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="dim must be an even int"):
        reflex.relative_sinusoid(distances, 5)


def test_tiled_many_tiles_equals_dense(small_tiles):
    q, k, v = qkv_host(4, length=30, key_length=47)
    w_r, u, vb = weights(4)
    dense = reflex.xl_relative_attention(q, k, v, w_r=w_r, content_bias=u, position_bias=vb, implementation="dense",
                                         return_lse=True)
    tiled = reflex.xl_relative_attention(q, k, v, w_r=w_r, content_bias=u, position_bias=vb,
                                         implementation="tiled", return_lse=True)
    assert max_abs(dense[0], tiled[0]) < 1e-14 and max_abs(dense[1], tiled[1]) < 1e-13
    assert max_abs(dense[0], xl_by_hand(q, k, v, w_r, u, vb)) < 1e-14


def test_edges_and_errors(backend):
    q, k, v = qkv_host(5, length=1, key_length=1)
    w_r, u, vb = weights(5)
    out = reflex.xl_relative_attention(*(backend.asarray(a) for a in (q, k, v)), w_r=backend.asarray(w_r),
                                       content_bias=backend.asarray(u), position_bias=backend.asarray(vb))
    assert max_abs(backend.to_numpy(out), numpy.repeat(v, 2, axis=-3)) < 1e-15
    with pytest.raises(ValueError, match="content_bias must have shape"):
        reflex.xl_relative_attention(q, k, v, w_r=w_r, content_bias=u[:2], position_bias=vb)
    with pytest.raises(ValueError, match="N even"):
        reflex.xl_relative_attention(q, k, v, w_r=w_r[..., :5], content_bias=u, position_bias=vb)
