"""memory_compressed_attention: strided convolution + attention vs NumPy, identity limit, causal rule, errors."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def conv(x, w):
    """y_t = Σ_r x_{tκ+r} W_r, written as an explicit loop."""
    kappa = w.shape[-3]
    steps = x.shape[-2] // kappa
    return numpy.stack([sum(x[..., t * kappa + r, :] @ w[..., r, :, :] if w.ndim == 3 else
                            numpy.einsum("...d,...de->...e", x[..., t * kappa + r, :], w[..., r, :, :])
                            for r in range(kappa)) for t in range(steps)], axis=-2)


def naive(q, k, v, kw, vw, *, causal_offset=None):
    kappa = kw.shape[-3]
    r = q.shape[-3] // k.shape[-3]
    kc, vc = numpy.repeat(conv(k, kw), r, axis=-3), numpy.repeat(conv(v, vw), r, axis=-3)
    s = q @ numpy.swapaxes(kc, -1, -2) / numpy.sqrt(q.shape[-1])
    if causal_offset is not None:
        slots = numpy.arange(kc.shape[-2])[None, :]
        s = numpy.where(slots * kappa + kappa - 1 <= numpy.arange(q.shape[-2])[:, None] + causal_offset, s, -numpy.inf)
    m = s.max(-1, keepdims=True)
    w = numpy.exp(s - numpy.where(numpy.isfinite(m), m, 0))
    total = w.sum(-1, keepdims=True)
    return (w @ vc) / numpy.where(total > 0, total, 1)


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_matches_formula_on_every_backend(backend, causal):
    q, k, v = qkv_host(1, length=7, key_length=12)
    kw = random.normal((3, 5, 5), seed=2)
    vw = random.normal((2, 3, 3, 4), seed=3)  # per kv head, E' = 4
    out = reflex.memory_compressed_attention(*(backend.asarray(a) for a in (q, k, v)), kernel_size=3,
                                             k_weight=backend.asarray(kw), v_weight=backend.asarray(vw), causal=causal)
    offset = None if not causal else 0 if causal == "top_left" else 5
    got = backend.to_numpy(out)
    assert got.shape == (2, 4, 7, 4)
    assert max_abs(got, naive(q, k, v, kw, vw, causal_offset=offset)) < 1e-14


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_kernel_one_identity_weights_is_full_attention(causal):
    q, k, v = qkv_host(4, length=6, key_length=9)
    out, lse = reflex.memory_compressed_attention(q, k, v, kernel_size=1, k_weight=numpy.eye(5)[None],
                                                  v_weight=numpy.eye(3)[None], causal=causal, return_lse=True)
    ref, ref_lse = reflex.full_attention(q, k, v, causal=causal, return_lse=True)
    assert max_abs(out, ref) <= 1e-15 and max_abs(lse, ref_lse) <= 1e-15


def test_causal_slots_become_visible_only_when_complete():
    q, k, v = qkv_host(5, batch=(), heads=1, kv_heads=1, length=8, key_length=8)
    kw, vw = random.normal((4, 5, 5), seed=6), random.normal((4, 3, 3), seed=7)
    out, lse = reflex.memory_compressed_attention(q, k, v, kernel_size=4, k_weight=kw, v_weight=vw, causal=True,
                                                  return_lse=True)
    assert numpy.all(out[0, :3] == 0) and numpy.all(lse[0, :3] == -numpy.inf)  # slot 0 complete at i = 3
    assert max_abs(out[0, 3:7], numpy.broadcast_to(conv(v, vw)[0, 0], (4, 3))) < 1e-15  # one slot: its value
    tiled = reflex.memory_compressed_attention(q, k, v, kernel_size=4, k_weight=kw, v_weight=vw, causal=True,
                                               implementation="tiled")
    assert max_abs(tiled, out) < 1e-15


def test_errors():
    q, k, v = qkv_host(8, length=4, key_length=9)
    kw, vw = numpy.ones((2, 5, 5)), numpy.ones((2, 3, 3))
    with pytest.raises(ValueError, match="not a multiple of kernel_size = 2"):
        reflex.memory_compressed_attention(q, k, v, kernel_size=2, k_weight=kw, v_weight=vw)
    with pytest.raises(ValueError, match=r"k_weight must have shape \(\.\.\., kernel_size, in, out\) = \(\.\.\., 3, 5, out\)"):
        reflex.memory_compressed_attention(q, k, v, kernel_size=3, k_weight=kw, v_weight=numpy.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="head dim"):
        reflex.memory_compressed_attention(q, k, v, kernel_size=3, k_weight=numpy.ones((3, 5, 4)),
                                           v_weight=numpy.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="kernel_size must be"):
        reflex.memory_compressed_attention(q, k, v, kernel_size=0, k_weight=kw, v_weight=vw)
