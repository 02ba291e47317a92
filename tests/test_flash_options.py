"""flash-attn parameters: ``window`` with ``None`` sides, ``sink_tokens``, ``attention_chunk``, ``qv``.

Each against an explicit mask or formula built here (≤ 1e-15·max(1, |ref|)), on the backend matrix, through dense, tiled
(with small tiles, so the tile filters are exercised) and gather, with gradients by central differences.
"""

from __future__ import annotations

import math

import numpy
import pytest

import reflex
from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._patterns import check_window, chunk_pattern, sink_band_pattern
from tests.helpers import assert_vjp_matches_finite_differences, max_abs, qkv_host


def explicit(q, k, v, *, mask=None, scale=None, qv=None):
    """Host softmax attention over an explicit boolean mask (L, S); qv adds qv·vᵀ to q·kᵀ before scaling."""
    r = q.shape[-3] // k.shape[-3]
    k, v = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    if scale is None:
        scale = 1 / math.sqrt(q.shape[-1] + (0 if qv is None else v.shape[-1]))
    raw = q @ numpy.swapaxes(k, -1, -2)
    if qv is not None:
        raw = raw + qv @ numpy.swapaxes(v, -1, -2)
    s = scale * raw
    if mask is not None:
        s = numpy.where(mask, s, -numpy.inf)
    m = numpy.max(s, axis=-1, keepdims=True)
    m = numpy.where(numpy.isfinite(m), m, 0.0)
    w = numpy.exp(s - m)
    total = w.sum(-1, keepdims=True)
    out = numpy.where(total > 0, (w @ v) / numpy.where(total > 0, total, 1.0), 0.0)
    with numpy.errstate(divide="ignore"):
        lse = (m + numpy.log(total))[..., 0]
    return out, lse


def within(got, ref, rtol=1e-15):
    """max |got − ref| ≤ rtol·max(1, max|ref|): 1e-15 at unit scale (at magnitude 2 one ulp is 4.4e-16, and the
    gather kernel sums in another order than NumPy's matmul)."""
    ref = numpy.asarray(ref, dtype=numpy.float64)
    finite = numpy.isfinite(ref)
    size = float(numpy.max(numpy.abs(ref[finite]))) if finite.any() else 0.0
    return max_abs(got, ref) <= rtol * max(1.0, size)


def band_mask(length, key_length, left, right, *, offset=0, sinks=0):
    """flash-attn's local mask (utils/testing.py construct_local_mask) as 'allowed': the right bound always,
    the left bound unless the key is one of the first ``sinks``."""
    i = numpy.arange(length)[:, None] + offset
    j = numpy.arange(key_length)[None, :]
    ok = numpy.ones((length, key_length), dtype=bool)
    if right is not None and right >= 0:
        ok &= j <= i + right
    if left is not None and left >= 0:
        ok &= (j >= i - left) | (j < sinks)
    return ok


def chunk_mask(length, key_length, chunk):
    """flash-attn 3's chunk mask (construct_chunk_mask) as 'allowed': start = t − t mod c, t = i + S − L."""
    t = numpy.arange(length)[:, None] + key_length - length
    start = t - numpy.mod(t, chunk)
    j = numpy.arange(key_length)[None, :]
    return (j >= start) & (j < start + chunk)


# --- windows: None = unbounded ---------------------------------------------------------------------

def test_window_none_is_unbounded_like_minus_one():
    assert check_window((None, 3)) == (-1, 3) and check_window([2, None]) == (2, -1)
    assert check_window((None, None)) == (-1, -1)
    for bad in ((-2, 0), (1.0, 2), (True, 1), (1,), "1,1", (None, -3)):
        with pytest.raises(ValueError, match="window"):
            check_window(bad)
    q, k, v = qkv_host(1, length=6, key_length=9)
    for window, same in (((None, 1), (-1, 1)), ((2, None), (2, -1)), ((None, None), (-1, -1))):
        for implementation in ("auto", "dense", "gather"):
            a = reflex.sliding_window_attention(q, k, v, window=window, alignment="bottom_right",
                                                implementation=implementation)
            b = reflex.sliding_window_attention(q, k, v, window=same, alignment="bottom_right",
                                                implementation=implementation)
            assert numpy.array_equal(a, b)
    # the shared check: another windowed mechanism takes None too
    a = reflex.dilated_attention(q, k, v, window=(None, 2), dilation=2)
    b = reflex.dilated_attention(q, k, v, window=(-1, 2), dilation=2)
    assert numpy.array_equal(a, b)


# --- sink tokens ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled", "gather"])
@pytest.mark.parametrize("alignment,length,key_length,window,sinks", [
    ("top_left", 9, 9, (2, 0), 2),
    ("top_left", 9, 9, (1, 1), 3),      # queries 0..2 sit on sink positions
    ("bottom_right", 4, 11, (3, 0), 2),
    ("bottom_right", 7, 5, (1, 2), 1),  # L > S: rows before the first key
    ("top_left", 6, 8, (0, 0), 8),      # every key a sink
    ("top_left", 6, 8, (None, 0), 2),   # unbounded left: the sinks change nothing
])
def test_sink_tokens_equal_the_explicit_mask(backend, implementation, alignment, length, key_length, window, sinks):
    q, k, v = qkv_host(2, length=length, key_length=key_length)
    out, lse = reflex.sliding_window_attention(*(backend.asarray(a) for a in (q, k, v)), window=window,
                                               alignment=alignment, sink_tokens=sinks, return_lse=True,
                                               implementation=implementation)
    offset = 0 if alignment == "top_left" else key_length - length
    ref_out, ref_lse = explicit(q, k, v, mask=band_mask(length, key_length, *window, offset=offset, sinks=sinks))
    assert within(backend.to_numpy(out), ref_out)
    assert within(backend.to_numpy(lse), ref_lse)


def test_sink_tokens_with_small_tiles_and_the_registry_pattern():
    q, k, v = qkv_host(3, length=23, key_length=29)
    p = _kernels.prepare(q, k, v)
    pattern = sink_band_pattern(4, 1, 29 - 23, 3)
    dense = _kernels.dense(p, scale=0.5, mask=pattern.allowed)
    for bq, bk in ((1, 1), (3, 4), (8, 2)):
        tiled = _kernels.tiled(p, scale=0.5, mask=pattern.allowed, tile_active=pattern.tile_active, block_q=bq,
                               block_k=bk)
        assert max_abs(tiled[0], dense[0]) <= 1e-15 and max_abs(tiled[1], dense[1]) <= 1e-15
    pat = reflex.get("sliding_window").pattern(q, k, v, window=(4, 1), alignment="bottom_right", sink_tokens=3)
    assert numpy.array_equal(numpy.asarray(pat)[0, 0], band_mask(23, 29, 4, 1, offset=6, sinks=3))


def test_sink_tokens_vjp_matches_central_differences():
    q, k, v = qkv_host(4, length=6, key_length=6, dim=3, value_dim=2)
    rng = numpy.random.default_rng(0)
    assert_vjp_matches_finite_differences("sliding_window", {"q": q, "k": k, "v": v}, rng.normal(size=(2, 4, 6, 2)),
                                          d_lse=rng.normal(size=(2, 4, 6)),
                                          params={"window": (1, 0), "sink_tokens": 2}, max_entries=40)


# --- attention_chunk -------------------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", ["dense", "tiled"])
@pytest.mark.parametrize("causal,length,key_length,chunk", [
    (False, 9, 9, 4), ("top_left", 9, 9, 3), ("bottom_right", 5, 12, 4), (False, 8, 5, 3), ("bottom_right", 8, 5, 2),
    (False, 7, 7, 1), (False, 7, 7, 100),
])
def test_full_attention_chunk_equals_the_explicit_mask(backend, implementation, causal, length, key_length, chunk):
    q, k, v = qkv_host(5, length=length, key_length=key_length)
    out, lse = reflex.full_attention(*(backend.asarray(a) for a in (q, k, v)), causal=causal, attention_chunk=chunk,
                                     return_lse=True, implementation=implementation)
    allowed = chunk_mask(length, key_length, chunk)
    if causal:
        offset = 0 if causal == "top_left" else key_length - length
        allowed &= numpy.arange(key_length)[None, :] <= numpy.arange(length)[:, None] + offset
    ref_out, ref_lse = explicit(q, k, v, mask=allowed)
    assert within(backend.to_numpy(out), ref_out)
    assert within(backend.to_numpy(lse), ref_lse)


@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled", "gather"])
def test_sliding_window_chunk_and_sinks_compose(implementation):
    q, k, v = qkv_host(6, length=10, key_length=13)
    out = reflex.sliding_window_attention(q, k, v, window=(5, 0), alignment="bottom_right", attention_chunk=4,
                                          sink_tokens=1, implementation=implementation)
    allowed = band_mask(10, 13, 5, 0, offset=3, sinks=1) & chunk_mask(10, 13, 4)
    assert within(out, explicit(q, k, v, mask=allowed)[0])
    pat = reflex.get("sliding_window").pattern(q, k, v, window=(5, 0), alignment="bottom_right", attention_chunk=4,
                                               sink_tokens=1)
    assert numpy.array_equal(numpy.asarray(pat)[1, 2], allowed)


def test_chunk_tile_filter_with_small_tiles():
    q, k, v = qkv_host(7, length=21, key_length=30)
    p = _kernels.prepare(q, k, v)
    pattern = chunk_pattern(4, 30 - 21)
    dense = _kernels.dense(p, scale=0.5, mask=pattern.allowed)
    for bq, bk in ((1, 1), (3, 5), (7, 4)):
        tiled = _kernels.tiled(p, scale=0.5, mask=pattern.allowed, tile_active=pattern.tile_active, block_q=bq,
                               block_k=bk)
        assert max_abs(tiled[0], dense[0]) <= 1e-15 and max_abs(tiled[1], dense[1]) <= 1e-15


def test_attention_chunk_vjp_and_errors():
    q, k, v = qkv_host(8, length=6, key_length=7, dim=3, value_dim=2)
    rng = numpy.random.default_rng(1)
    assert_vjp_matches_finite_differences("full", {"q": q, "k": k, "v": v}, rng.normal(size=(2, 4, 6, 2)),
                                          d_lse=rng.normal(size=(2, 4, 6)),
                                          params={"attention_chunk": 3, "causal": "bottom_right"}, max_entries=40)
    for bad in (0, -1, 2.0, True):
        with pytest.raises((TypeError, ValueError), match="attention_chunk"):
            reflex.full_attention(q, k, v, attention_chunk=bad)
        with pytest.raises((TypeError, ValueError), match="attention_chunk"):
            reflex.sliding_window_attention(q, k, v, window=(1, 1), attention_chunk=bad)
    with pytest.raises((TypeError, ValueError), match="sink_tokens"):
        reflex.sliding_window_attention(q, k, v, window=(1, 1), sink_tokens=-1)
    with pytest.raises(ValueError, match="sink_tokens"):
        reflex.sliding_window_attention(q, k, v, window=(1, 1), sink_tokens=1, implementation="numpy")


# --- qv ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", ["dense", "tiled"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_qv_equals_the_explicit_formula(backend, implementation, kv_heads):
    q, k, v = qkv_host(9, kv_heads=kv_heads, length=5, key_length=8, dim=4, value_dim=3)
    qv = random.normal((2, 4, 5, 3), seed=10)
    mask = random.uniform((5, 8), seed=11) < 0.8
    out, lse = reflex.full_attention(*(backend.asarray(a) for a in (q, k, v)), qv=backend.asarray(qv),
                                     mask=backend.asarray(mask), causal="bottom_right", return_lse=True,
                                     implementation=implementation)
    allowed = mask & (numpy.arange(8)[None, :] <= numpy.arange(5)[:, None] + 3)
    ref_out, ref_lse = explicit(q, k, v, qv=qv, mask=allowed)  # default scale 1/√(D + E)
    assert within(backend.to_numpy(out), ref_out)
    assert within(backend.to_numpy(lse), ref_lse)
    out2 = reflex.full_attention(*(backend.asarray(a) for a in (q, k, v)), qv=backend.asarray(qv), scale=0.3)
    assert within(backend.to_numpy(out2), explicit(q, k, v, qv=qv, scale=0.3)[0])


def test_qv_equals_concatenated_heads_and_blhd_layout():
    q, k, v = qkv_host(12, length=4, key_length=6, dim=3, value_dim=5)
    qv = random.normal((2, 4, 4, 5), seed=13)
    ref = reflex.full_attention(numpy.concatenate([q, qv], -1), numpy.concatenate([k, v], -1), v)
    assert within(reflex.full_attention(q, k, v, qv=qv), ref)
    swap = lambda x: numpy.swapaxes(x, -3, -2)  # noqa: E731
    flash = reflex.full_attention(swap(q), swap(k), swap(v), qv=swap(qv), layout="blhd")
    assert within(swap(flash), ref)


def test_qv_vjp_matches_central_differences_and_torch():
    q, k, v = qkv_host(14, length=4, key_length=5, dim=3, value_dim=2)
    qv = random.normal((2, 4, 4, 2), seed=15)
    bias = random.normal((4, 4, 5), seed=16)
    rng = numpy.random.default_rng(2)
    d_out, d_lse = rng.normal(size=(2, 4, 4, 2)), rng.normal(size=(2, 4, 4))
    for implementation in ("dense", "tiled"):
        grads = assert_vjp_matches_finite_differences(
            "full", {"q": q, "k": k, "v": v, "qv": qv, "bias": bias}, d_out, d_lse=d_lse,
            params={"implementation": implementation, "causal": True}, max_entries=40)
    torch = pytest.importorskip("torch")
    qt, kt, vt, qvt, bt = (torch.tensor(a, requires_grad=True) for a in (q, k, v, qv, bias))
    vr = torch.repeat_interleave(vt, 2, dim=-3)
    s = (qt @ torch.repeat_interleave(kt, 2, dim=-3).transpose(-1, -2) + qvt @ vr.transpose(-1, -2)) / math.sqrt(5) + bt
    s = torch.where(torch.arange(5)[None, :] <= torch.arange(4)[:, None], s, -math.inf)
    out, lse = torch.softmax(s, dim=-1) @ vr, torch.logsumexp(s, dim=-1)
    ((out * torch.from_numpy(d_out)).sum() + (lse * torch.from_numpy(d_lse)).sum()).backward()
    for name, t in (("q", qt), ("k", kt), ("v", vt), ("qv", qvt), ("bias", bt)):
        assert max_abs(grads[name], t.grad.numpy()) <= 1e-14, name
    swap = lambda x: numpy.swapaxes(x, -3, -2)  # noqa: E731
    flash = reflex.vjp("full", {"q": swap(q), "k": swap(k), "v": swap(v), "qv": swap(qv), "bias": bias}, swap(d_out),
                       d_lse=d_lse, causal=True, layout="blhd")
    for name in ("q", "k", "v", "qv"):
        assert max_abs(swap(flash[name]), grads[name]) <= 1e-15, name


def test_qv_errors():
    q, k, v = qkv_host(17, length=4, key_length=5, dim=3, value_dim=2)
    with pytest.raises(ValueError, match="qv"):
        reflex.full_attention(q, k, v, qv=random.normal((2, 4, 4, 3), seed=1))
    with pytest.raises(ValueError, match="qv"):
        reflex.full_attention(q, k, v, qv=random.normal((2, 4, 4, 2), seed=1), softcap=5.0)
