"""poolingformer_attention: band + pooled levels vs NumPy on every backend, limit equals full, pooling, errors."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex.mechanisms import poolingformer
from tests.helpers import max_abs, qkv_host


def softmax_attend(q, k, v, allowed=None):
    r = q.shape[-3] // k.shape[-3]
    k, v = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    s = q @ numpy.swapaxes(k, -1, -2) / numpy.sqrt(q.shape[-1])
    if allowed is not None:
        s = numpy.where(allowed, s, -numpy.inf)
    m = s.max(-1, keepdims=True)
    w = numpy.exp(s - numpy.where(numpy.isfinite(m), m, 0))
    return (w @ v) / numpy.maximum(w.sum(-1, keepdims=True), 1e-300)


def pooled(x, kernel, stride, how):
    slots = (x.shape[-2] - kernel) // stride + 1
    f = numpy.mean if how == "mean" else numpy.max
    return numpy.stack([f(x[..., t * stride:t * stride + kernel, :], axis=-2) for t in range(slots)], axis=-2)


def band(length, key_length, left, right):
    rel = numpy.arange(key_length)[None, :] - numpy.arange(length)[:, None]
    return ((rel >= -left) | (left < 0)) & ((rel <= right) | (right < 0))


@pytest.mark.parametrize("pool,kernel,stride", [("mean", 2, 2), ("max", 3, 2), ("mean", 4, 1)])
@pytest.mark.parametrize("window", [(1, 1), (2, 0), (-1, 0)])
def test_matches_two_levels_on_every_backend(backend, pool, kernel, stride, window):
    q, k, v = qkv_host(1, length=7, key_length=10)
    out = reflex.poolingformer_attention(*(backend.asarray(a) for a in (q, k, v)), window=window, pool=pool,
                                         kernel_size=kernel, stride=stride)
    expected = (softmax_attend(q, k, v, band(7, 10, *window))
                + softmax_attend(q, pooled(k, kernel, stride, pool), pooled(v, kernel, stride, pool)))
    assert max_abs(backend.to_numpy(out), expected) < 1e-14


@pytest.mark.parametrize("window", [(-1, -1), (12, 12), (9, 20)])
def test_window_covering_the_sequence_without_pooling_is_full(window):
    q, k, v = qkv_host(2, length=8, key_length=11)
    for implementation in ("dense", "tiled"):
        out = reflex.poolingformer_attention(q, k, v, window=window, pool=None, implementation=implementation)
        assert max_abs(out, reflex.full_attention(q, k, v)) <= 1e-15


def test_band_level_equals_full_with_the_band_mask():
    q, k, v = qkv_host(3, length=9, key_length=6)
    out = reflex.poolingformer_attention(q, k, v, window=(1, 0), pool=None)
    assert max_abs(out, reflex.full_attention(q, k, v, mask=band(9, 6, 1, 0))) <= 1e-15
    assert numpy.all(out[..., 7:, :] == 0)  # queries 7, 8 have no key in their window


def test_pool_sequence_slots():
    x = numpy.arange(7.0).reshape(7, 1)
    xp = reflex.backends.numpy_namespace()
    assert poolingformer.pool_sequence(xp, x, pool="mean", kernel_size=3, stride=2)[:, 0].tolist() == [1.0, 3.0, 5.0]
    assert poolingformer.pool_sequence(xp, x, pool="max", kernel_size=7, stride=1)[:, 0].tolist() == [6.0]


def test_errors():
    q, k, v = qkv_host(4, length=4, key_length=5)
    with pytest.raises(ValueError, match="window"):
        reflex.poolingformer_attention(q, k, v, window=(1,))
    with pytest.raises(ValueError, match="pool must be"):
        reflex.poolingformer_attention(q, k, v, window=(1, 1), pool="sum")
    with pytest.raises(ValueError, match="kernel_size must be at most S = 5"):
        reflex.poolingformer_attention(q, k, v, window=(1, 1), kernel_size=6)
    with pytest.raises(ValueError, match="stride must be"):
        reflex.poolingformer_attention(q, k, v, window=(1, 1), stride=0)
