"""alibi: slopes (paper, any head count), bias conventions (flash-attn, FlexAttention), engine paths."""

from __future__ import annotations

import math
import warnings

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def paper_slopes(n):
    """Press et al.'s reference ``get_slopes`` (github.com/ofirpress/attention_with_linear_biases)."""
    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("heads", list(range(1, 65)) + [80, 96, 100, 128])
def test_slopes_match_the_paper_for_any_head_count(heads):
    got = reflex.alibi_slopes(heads)
    assert got.shape == (heads,) and got.dtype == numpy.float64
    # the reference code's start * start**i carries a few ulp of rounding; ours is the exact power
    numpy.testing.assert_allclose(got, paper_slopes(heads), rtol=1e-14, atol=0)


@pytest.mark.parametrize("heads", [3, 6, 12, 15, 40, 100])
def test_slopes_are_correctly_rounded_powers(heads):
    mpmath = pytest.importorskip("mpmath")
    got = reflex.alibi_slopes(heads)
    closest = 2 ** math.floor(math.log2(heads))
    exponents = [mpmath.mpf(h + 1) / closest for h in range(closest)]
    exponents += [mpmath.mpf(h + 1) / (2 * closest) for h in range(0, 2 * closest, 2)][: heads - closest]
    with mpmath.workdps(50):
        exact = [float(mpmath.power(2, -8 * e)) for e in exponents]  # float() rounds to nearest
    assert got.tolist() == exact


def test_slopes_exact_values():
    assert reflex.alibi_slopes(8).tolist() == [2.0 ** -k for k in range(1, 9)]
    # 6 heads: the 4-head slopes, then slopes 0 and 2 of the 8-head sequence
    assert reflex.alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    for heads in (2, 4, 16, 32):  # powers of two: FlexAttention's example exp2(-8(h+1)/H)
        assert reflex.alibi_slopes(heads).tolist() == [2.0 ** (-8 * (h + 1) / heads) for h in range(heads)]


def test_slopes_on_backend(backend):
    got = reflex.alibi_slopes(12, xp=backend.xp, device=backend.device)
    numpy.testing.assert_array_equal(backend.to_numpy(got), reflex.alibi_slopes(12))


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_bias_is_flash_attn_convention(backend, alignment):
    slopes = random.uniform((3,), seed=1, low=0.1, high=1.0)
    length, key_length = 5, 8
    got = backend.to_numpy(reflex.alibi_bias(backend.asarray(slopes), length, key_length, alignment=alignment))
    delta = key_length - length if alignment == "bottom_right" else 0
    i, j = numpy.arange(length)[:, None], numpy.arange(key_length)[None, :]
    # flash-attn docs: bias -alibi_slope * |i + seqlen_k - seqlen_q - j| (bottom-right)
    numpy.testing.assert_array_equal(got, -slopes[:, None, None] * numpy.abs(i + delta - j))
    flex = backend.to_numpy(reflex.alibi_bias(backend.asarray(slopes), length, key_length, alignment=alignment, symmetric=False))
    numpy.testing.assert_array_equal(flex, slopes[:, None, None] * (j - i - delta))
    causal = j <= i + delta
    numpy.testing.assert_array_equal(numpy.where(causal, got, 0), numpy.where(causal, flex, 0))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_equals_full_with_the_bias(backend, causal, alignment, implementation):
    q, k, v = qkv_host(2, heads=6, kv_heads=3, length=5, key_length=9)
    slopes = reflex.alibi_slopes(6)
    bias = reflex.alibi_bias(slopes, 5, 9, alignment=alignment)
    ref, ref_lse = reflex.full_attention(q, k, v, bias=bias, causal=alignment if causal else False, return_lse=True)
    out, lse = reflex.alibi_attention(*(backend.asarray(a) for a in (q, k, v)), causal=causal, alignment=alignment,
                                      return_lse=True, implementation=implementation)
    assert max_abs(backend.to_numpy(out), ref) < 1e-14
    assert max_abs(backend.to_numpy(lse), ref_lse) < 1e-13


def test_per_batch_slopes_and_edges(backend):
    q, k, v = qkv_host(3, batch=(2,), heads=4, kv_heads=1, length=1, key_length=6)
    slopes = random.uniform((2, 4), seed=2, low=0.1, high=2.0)
    out = reflex.alibi_attention(*(backend.asarray(a) for a in (q, k, v)), slopes=backend.asarray(slopes), causal=True)
    for b in range(2):
        bias = reflex.alibi_bias(slopes[b], 1, 6)
        ref = reflex.full_attention(q[b], k[b], v[b], bias=bias, causal="bottom_right")
        assert max_abs(backend.to_numpy(out)[b], ref) < 1e-14
    # L > S with top-left causal: no key for... every query sees key 0; S = 1 leaves a single key
    q, k, v = qkv_host(4, length=5, key_length=1)
    out = reflex.alibi_attention(*(backend.asarray(a) for a in (q, k, v)), causal=True, alignment="bottom_right")
    got = backend.to_numpy(out)
    assert numpy.all(got[..., :4, :] == 0)  # rows i + S - L < 0: fully masked, output 0
    assert max_abs(got[..., 4, :], numpy.repeat(v, 2, axis=-3)[..., 0, :]) < 1e-15


def test_huge_slopes_do_not_overflow():
    q, k, v = qkv_host(5, length=4, key_length=4)
    out = reflex.alibi_attention(q, k, v, slopes=numpy.full(4, 1e300))
    # every off-diagonal bias is -inf-like: each query sees only its own key (bottom-right, L = S)
    assert max_abs(out, numpy.repeat(v, 2, axis=-3)) < 1e-15


def test_matches_flex_attention_score_mod():
    torch = pytest.importorskip("torch")
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = qkv_host(6, batch=(1,), heads=8, kv_heads=8, length=16, key_length=16, dim=16, value_dim=16)
    slopes = torch.exp2(-(torch.arange(8, dtype=torch.float64) + 1) * 8.0 / 8)  # FlexAttention's ALiBi example

    def alibi_score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = flex.flex_attention(tq, tk, tv, score_mod=alibi_score_mod).numpy()
        block = flex.create_block_mask(causal_mask, None, None, 16, 16, device="cpu")
        causal = flex.flex_attention(tq, tk, tv, score_mod=alibi_score_mod, block_mask=block).numpy()
    ours = reflex.alibi_attention(q, k, v, slopes=slopes.numpy(), alignment="top_left", symmetric=False)
    assert max_abs(ours, plain) < 1e-14
    for symmetric in (True, False):
        ours = reflex.alibi_attention(q, k, v, alignment="top_left", causal=True, symmetric=symmetric)
        assert max_abs(ours, causal) < 1e-14


def test_errors():
    q, k, v = qkv_host(7)
    with pytest.raises(ValueError, match="slopes must have shape"):
        reflex.alibi_attention(q, k, v, slopes=numpy.ones(3))
    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        reflex.alibi_slopes(0)
    with pytest.raises(ValueError, match="alignment must be one of"):
        reflex.alibi_attention(q, k, v, alignment="center")
