"""predictive_attention: == host formula with torch conv2d; alpha = 1 is full; alpha = 0 is the convolved map."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host, softmax_map


def conv_host(x, kernel, bias=None):
    """Direct zero-padded cross-correlation loops."""
    h, c, kl, ks = kernel.shape
    lead, (length, key_length) = x.shape[:-3], x.shape[-2:]
    pad = numpy.zeros((*lead, c, length + kl - 1, key_length + ks - 1))
    pad[..., kl // 2:kl // 2 + length, ks // 2:ks // 2 + key_length] = x
    out = numpy.zeros((*lead, h, length, key_length))
    for a in range(kl):
        for b in range(ks):
            out += numpy.einsum("hc,...cls->...hls", kernel[:, :, a, b], pad[..., a:a + length, b:b + key_length])
    return out if bias is None else out + bias[:, None, None]


@pytest.mark.parametrize("causal", [False, True])
def test_matches_host_formula(backend, causal):
    q, k, v = qkv_host(0, length=5, key_length=7)
    prev = random.uniform((2, 3, 5, 7), seed=3)
    kernel, kb = random.normal((4, 3, 3, 5), seed=4), random.normal((4,), seed=5)
    out, mixed = reflex.predictive_attention(*(backend.asarray(a) for a in (q, k, v)), prev_weights=backend.asarray(prev),
                                             kernel=backend.asarray(kernel), kernel_bias=backend.asarray(kb), alpha=0.3,
                                             causal=causal, return_weights=True)
    ref_map = 0.3 * softmax_map(q, k, causal) + 0.7 * conv_host(prev, kernel, kb)
    assert max_abs(backend.to_numpy(mixed), ref_map) <= 1e-13
    assert max_abs(backend.to_numpy(out), ref_map @ numpy.repeat(v, 2, axis=-3)) <= 1e-13


def test_conv_matches_torch():
    torch = pytest.importorskip("torch")
    x, kernel, bias = random.normal((2, 3, 6, 4), seed=6), random.normal((5, 3, 3, 1), seed=7), random.normal((5,), seed=8)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(kernel), torch.from_numpy(bias), padding="same")
    got = reflex.attention_map_conv2d(x, kernel, bias=bias)
    assert max_abs(got, ref.numpy()) <= 1e-13
    assert max_abs(got, conv_host(x, kernel, bias)) <= 1e-13


def test_alpha_limits():
    q, k, v = qkv_host(1, length=4, key_length=6)
    prev, kernel = random.uniform((2, 4, 4, 6), seed=9), random.normal((4, 4, 1, 1), seed=10)
    only_current = reflex.predictive_attention(q, k, v, prev_weights=prev, kernel=kernel, alpha=1.0)
    assert max_abs(only_current, reflex.full_attention(q, k, v)) <= 1e-13
    identity = numpy.eye(4)[:, :, None, None]  # 1×1 identity kernel: the prediction is the previous map
    only_prev = reflex.predictive_attention(q, k, v, prev_weights=prev, kernel=identity, alpha=0.0)
    assert max_abs(only_prev, reflex.shared_map_attention(prev, v)) <= 1e-14


def test_errors():
    q, k, v = qkv_host(2, length=3, key_length=4)
    prev = numpy.ones((2, 4, 3, 4))
    with pytest.raises(ValueError, match="odd"):
        reflex.predictive_attention(q, k, v, prev_weights=prev, kernel=numpy.ones((4, 4, 2, 3)))
    with pytest.raises(ValueError, match="prev_weights must have shape"):
        reflex.predictive_attention(q, k, v, prev_weights=prev[..., :3], kernel=numpy.ones((4, 4, 1, 1)))
    with pytest.raises(ValueError, match="kernel must have shape"):
        reflex.predictive_attention(q, k, v, prev_weights=prev, kernel=numpy.ones((3, 4, 1, 1)))
