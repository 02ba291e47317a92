"""compressive: rate 1 + identity == recurrent_memory with m + n_c; against full over [slots; keys] by hand."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def compressive_by_hand(q, k, v, s, m, n_c, r, conv_k=None, conv_v=None):
    """full_attention over [all slots; all keys] with the mask of slots and keys each query may see."""
    length = q.shape[-2]
    count = length // r

    def slots(x, w):
        blocks = x[..., :count * r, :].reshape(*x.shape[:-2], count, r, x.shape[-1])
        return blocks.mean(-2) if w is None else numpy.einsum("...utf,tfg->...ug", blocks, w)

    keys = numpy.concatenate([slots(k, conv_k), k], axis=-2)
    values = numpy.concatenate([slots(v, conv_v), v], axis=-2)
    mask = numpy.zeros((length, count + length), dtype=bool)
    for i in range(length):
        start = (i // s) * s
        first = max(0, start - m)
        ready = first // r
        mask[i, max(0, ready - n_c):ready] = True
        mask[i, count + first:count + i + 1] = True
    return reflex.full_attention(q, keys, values, mask=mask)


@pytest.mark.parametrize("s,m,n_c", [(3, 2, 4), (4, 0, 2), (1, 1, 1), (5, 5, 100)])
def test_rate_one_identity_is_recurrent_memory_with_longer_memory(backend, s, m, n_c):
    q, k, v = qkv_host(1, length=13, key_length=13)
    ref = reflex.recurrent_memory_attention(q, k, v, segment_length=s, memory_length=m + n_c)
    args = [backend.asarray(a) for a in (q, k, v)]
    identity = {"conv_k": backend.asarray(numpy.eye(5)[None]), "conv_v": backend.asarray(numpy.eye(3)[None])}
    for extra in ({"compression": "mean"}, {"compression": "conv", **identity}):
        out = reflex.compressive_attention(*args, segment_length=s, memory_length=m, compressed_length=n_c, rate=1, **extra)
        assert max_abs(backend.to_numpy(out), ref) < 1e-14


@pytest.mark.parametrize("s,m,n_c,r", [(4, 3, 3, 2), (3, 0, 2, 3), (5, 4, 1, 4), (2, 2, 0, 2)])
def test_matches_full_over_slots_and_keys(backend, s, m, n_c, r):
    q, k, v = qkv_host(2, length=17, key_length=17)
    ref = compressive_by_hand(q, k, v, s, m, n_c, r)
    out = reflex.compressive_attention(*(backend.asarray(a) for a in (q, k, v)), segment_length=s, memory_length=m,
                                       compressed_length=n_c, rate=r)
    assert max_abs(backend.to_numpy(out), ref) < 1e-14
    conv_k, conv_v = random.normal((r, 5, 5), seed=3), random.normal((r, 3, 3), seed=4)
    ref = compressive_by_hand(q, k, v, s, m, n_c, r, conv_k, conv_v)
    out = reflex.compressive_attention(*(backend.asarray(a) for a in (q, k, v)), segment_length=s, memory_length=m,
                                       compressed_length=n_c, rate=r, compression="conv", conv_k=backend.asarray(conv_k),
                                       conv_v=backend.asarray(conv_v))
    assert max_abs(backend.to_numpy(out), ref) < 1e-14


def test_no_compressed_slots_is_recurrent_memory():
    q, k, v = qkv_host(5, length=9, key_length=9)
    out = reflex.compressive_attention(q, k, v, segment_length=3, memory_length=2, compressed_length=0, rate=2)
    assert max_abs(out, reflex.recurrent_memory_attention(q, k, v, segment_length=3, memory_length=2)) < 1e-15


def test_errors():
    q, k, v = qkv_host(6, length=6, key_length=6)
    options = dict(segment_length=2, memory_length=1, compressed_length=2, rate=2)
    with pytest.raises(ValueError, match="needs conv_k"):
        reflex.compressive_attention(q, k, v, compression="conv", **options)
    with pytest.raises(ValueError, match="conv_k must have shape"):
        reflex.compressive_attention(q, k, v, compression="conv", conv_k=numpy.zeros((1, 5, 5)),
                                     conv_v=numpy.zeros((2, 3, 3)), **options)
    with pytest.raises(ValueError, match="compression must be one of"):
        reflex.compressive_attention(q, k, v, compression="max", **options)
    with pytest.raises(ValueError, match="self-attention"):
        reflex.compressive_attention(q, k[..., :5, :], v[..., :5, :], **options)
