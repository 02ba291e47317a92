"""relative_shaw: against a textbook dense implementation, zero tables == full, clipping at ±k."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from reflex.mechanisms import _kernels
from tests.helpers import max_abs, qkv_host


def shaw_by_hand(q, k, v, rel_k, rel_v, *, offset=0, causal=None, scale=None):
    """Materialise a^K_{c(j−i)} for every (i, j), softmax, then Σ w (v + a^V): eqs. 3–4 of the paper."""
    heads, length, dim = q.shape[-3:]
    key_length = k.shape[-2]
    r = heads // k.shape[-3]
    k, v = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    clip = (rel_k.shape[-2] - 1) // 2
    dist = numpy.clip(numpy.arange(key_length)[None, :] - numpy.arange(length)[:, None] - offset, -clip, clip) + clip
    a_k = rel_k[..., dist, :]  # (H|, L, S, D)
    a_v = rel_v[..., dist, :] if rel_v is not None else 0.0
    scale = 1 / numpy.sqrt(dim) if scale is None else scale
    s = scale * numpy.einsum("...ld,...lsd->...ls", q, k[..., None, :, :] + a_k)
    if causal is not None:
        delta = 0 if causal == "top_left" else key_length - length
        s = numpy.where(numpy.arange(key_length)[None, :] <= numpy.arange(length)[:, None] + delta, s, -numpy.inf)
    m = numpy.max(s, axis=-1, keepdims=True)
    m = numpy.where(numpy.isfinite(m), m, 0.0)
    w = numpy.exp(s - m)
    total = w.sum(-1, keepdims=True)
    w = w / numpy.where(total > 0, total, 1.0)
    out = numpy.einsum("...ls,...lse->...le", w, v[..., None, :, :] + a_v)
    return out


@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("implementation", ["dense", "tiled"])
@pytest.mark.parametrize("per_head", [False, True])
def test_matches_textbook(backend, causal, implementation, per_head):
    q, k, v = qkv_host(1, length=6, key_length=11)
    lead = (4,) if per_head else ()
    rel_k, rel_v = random.normal((*lead, 7, 5), seed=2), random.normal((*lead, 7, 3), seed=3)
    ref = shaw_by_hand(q, k, v, rel_k, rel_v, offset=2, causal=causal)
    out = reflex.relative_shaw_attention(*(backend.asarray(a) for a in (q, k, v)), rel_k=backend.asarray(rel_k),
                                         rel_v=backend.asarray(rel_v), query_offset=2, causal=causal or False,
                                         implementation=implementation)
    assert max_abs(backend.to_numpy(out), ref) < 1e-14


def test_zero_tables_equal_full(backend):
    q, k, v = qkv_host(4, length=5, key_length=8)
    args = [backend.asarray(a) for a in (q, k, v)]
    out, lse = reflex.relative_shaw_attention(*args, rel_k=backend.asarray(numpy.zeros((9, 5))),
                                              rel_v=backend.asarray(numpy.zeros((9, 3))), causal=True, return_lse=True)
    ref, ref_lse = reflex.full_attention(q, k, v, causal=True, return_lse=True)
    assert max_abs(backend.to_numpy(out), ref) < 1e-15 and max_abs(backend.to_numpy(lse), ref_lse) < 1e-15


@pytest.mark.parametrize("clip", [0, 1, 2, 3])
def test_clipping_at_the_boundary(clip):
    """Distances beyond ±k use rows 0 and 2k exactly: tables differing only past ±k agree."""
    q, k, v = qkv_host(5, length=7, key_length=7)
    rel_k, rel_v = random.normal((2 * clip + 1, 5), seed=6), random.normal((2 * clip + 1, 3), seed=7)
    out = reflex.relative_shaw_attention(q, k, v, rel_k=rel_k, rel_v=rel_v)
    # the same through wider tables whose rows beyond ±clip repeat the boundary rows
    wide = 6
    index = numpy.clip(numpy.arange(-wide, wide + 1), -clip, clip) + clip
    out_wide = reflex.relative_shaw_attention(q, k, v, rel_k=rel_k[index], rel_v=rel_v[index])
    assert max_abs(out, out_wide) < 1e-14
    assert max_abs(out, shaw_by_hand(q, k, v, rel_k, rel_v)) < 1e-14
    if clip:
        # perturbing row 2k (distance ≥ k) changes exactly the pairs at j − i ≥ k: query 0 sees key k
        bumped = rel_v.copy()
        bumped[-1] += 1.0
        moved = reflex.relative_shaw_attention(q[..., :1, :], k, v, rel_k=rel_k, rel_v=bumped)
        base = reflex.relative_shaw_attention(q[..., :1, :], k, v, rel_k=rel_k, rel_v=rel_v)
        identity = numpy.broadcast_to(numpy.eye(7), (2, 2, 7, 7))  # v = I: the output rows are the weights
        weights = shaw_by_hand(q[..., :1, :], k, identity, rel_k, None)
        assert max_abs(moved - base, numpy.repeat(weights[..., clip:].sum(-1, keepdims=True), 3, axis=-1)) < 1e-14


def test_tiled_many_tiles_equals_dense():
    q, k, v = qkv_host(8, length=40, key_length=53)
    rel_k, rel_v = random.normal((4, 9, 5), seed=9), random.normal((4, 9, 3), seed=10)
    p = _kernels.prepare(q, k, v)
    from reflex.mechanisms._relative import RelativeLogits

    clip = 4
    term = RelativeLogits(p.xp, p.q * 0.3, lambda a, b: rel_k[:, numpy.clip(numpy.arange(a, b + 1), -clip, clip) + clip],
                          lambda a, b, d_table: {}, offset=3)
    dense = _kernels.dense(p, scale=0.3, bias=term)
    tiled = _kernels.tiled(p, scale=0.3, bias=term, block_q=8, block_k=5)
    assert max_abs(dense[0], tiled[0]) < 1e-14 and max_abs(dense[1], tiled[1]) < 1e-13
    ref = shaw_by_hand(q, k, v, rel_k, rel_v, offset=3, scale=0.3)
    out = reflex.relative_shaw_attention(q, k, v, rel_k=rel_k, rel_v=rel_v, query_offset=3, scale=0.3)
    assert max_abs(out, ref) < 1e-14


def test_edges_and_errors(backend):
    q, k, v = qkv_host(11, length=3, key_length=1)
    rel_k, rel_v = random.normal((5, 5), seed=12), random.normal((5, 3), seed=13)
    out = reflex.relative_shaw_attention(*(backend.asarray(a) for a in (q, k, v)), rel_k=backend.asarray(rel_k),
                                         rel_v=backend.asarray(rel_v), causal="top_left")
    got = backend.to_numpy(out)
    # query 0 sees key 0 at distance 0: v_0 + a^V_0; queries 1, 2 see key 0 at distances -1, -2
    for i in range(3):
        assert max_abs(got[..., i, :], numpy.repeat(v, 2, axis=-3)[..., 0, :] + rel_v[2 - i]) < 1e-15
    q, k, v = qkv_host(14, length=4, key_length=2)
    out = reflex.relative_shaw_attention(q, k, v, rel_k=rel_k, rel_v=rel_v, causal="bottom_right")
    assert numpy.all(out[..., :2, :] == 0)  # rows before the first key: fully masked → 0
    with pytest.raises(ValueError, match="odd number"):
        reflex.relative_shaw_attention(q, k, v, rel_k=numpy.zeros((4, 5)))
    with pytest.raises(ValueError, match="max_distance is 3"):
        reflex.relative_shaw_attention(q, k, v, rel_k=rel_k, max_distance=3)
    with pytest.raises(ValueError, match="rel_v must have shape"):
        reflex.relative_shaw_attention(q, k, v, rel_k=rel_k, rel_v=numpy.zeros((5, 4)))
