"""full_attention: the backend matrix, dense vs tiled, properties, edges, errors, torch SDPA."""

from __future__ import annotations

import importlib.util
import math

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from reflex import random
from reflex.mechanisms import _kernels
from tests.helpers import max_abs, qkv_host

HAS_TORCH = importlib.util.find_spec("torch") is not None


def naive(q, k, v, *, mask=None, bias=None, scale=None, softcap=None):
    """Textbook host reference: repeat kv heads, materialise scores, softmax, multiply."""
    r = q.shape[-3] // k.shape[-3]
    k, v = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ numpy.swapaxes(k, -1, -2)
    if softcap is not None:
        s = softcap * numpy.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = numpy.where(mask, s, -numpy.inf)
    m = numpy.max(s, axis=-1, keepdims=True)
    m = numpy.where(numpy.isfinite(m), m, 0.0)
    w = numpy.exp(s - m)
    total = w.sum(-1, keepdims=True)
    out = numpy.where(total > 0, (w @ v) / numpy.where(total > 0, total, 1), 0.0)
    with numpy.errstate(divide="ignore"):
        lse = (m + numpy.log(total))[..., 0]
    return out, lse


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_matches_naive_on_every_backend(backend, causal, implementation):
    q, k, v = qkv_host(1, length=7, key_length=11)
    mask = random.uniform((2, 1, 7, 11), seed=5) < 0.8
    bias = random.normal((4, 1, 11), seed=6)
    args = [backend.asarray(a) for a in (q, k, v)]
    out, lse = reflex.full_attention(*args, mask=backend.asarray(mask), bias=backend.asarray(bias), causal=causal,
                                     softcap=3.0, return_lse=True, implementation=implementation)
    full_mask = mask
    if causal:
        offset = 0 if causal == "top_left" else 11 - 7
        full_mask = mask & (numpy.arange(11)[None, :] <= numpy.arange(7)[:, None] + offset)
    ref_out, ref_lse = naive(q, k, v, mask=full_mask, bias=bias, softcap=3.0)
    assert max_abs(backend.to_numpy(out), ref_out) < 1e-14
    assert max_abs(backend.to_numpy(lse), ref_lse) < 1e-13
    assert backend.to_numpy(out).dtype == numpy.float64


def test_tiled_equals_dense_across_many_tiles():
    q, k, v = qkv_host(2, length=37, key_length=53, dim=8, value_dim=4)
    p = _kernels.prepare(q, k, v)
    mask = random.uniform((2, 4, 37, 53), seed=3) < 0.5
    for softcap in (None, 1.5):
        dense = _kernels.dense(p, scale=0.3, mask=mask, softcap=softcap)
        for bq, bk in [(1, 1), (5, 7), (16, 8), (37, 53), (100, 100)]:
            tiled = _kernels.tiled(p, scale=0.3, mask=mask, softcap=softcap, block_q=bq, block_k=bk)
            assert max_abs(tiled[0], dense[0]) <= 1e-13
            assert max_abs(tiled[1], dense[1]) <= 1e-13


def test_gather_equals_dense_with_pattern():
    q, k, v = qkv_host(3, length=6, key_length=10)
    p = _kernels.prepare(q, k, v)
    idx = random.choice((2, 4, 6), seed=4, population=10, count=4)
    idx[..., 0, 3] = -1  # padding
    allowed = numpy.zeros((2, 4, 6, 10), dtype=bool)
    numpy.put_along_axis(allowed, numpy.where(idx < 0, 0, idx), True, axis=-1)
    allowed[:, :, 0, :] = False
    for b in range(2):
        for h in range(4):
            allowed[b, h, 0, idx[b, h, 0, :3]] = True
    out, lse = _kernels.gather(p, idx, scale=0.5, block_q=4)
    ref = _kernels.dense(p, scale=0.5, mask=allowed)
    assert max_abs(out, ref[0]) < 1e-14 and max_abs(lse, ref[1]) < 1e-14
