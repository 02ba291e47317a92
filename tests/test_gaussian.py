"""gaussian_prior, gaussian_transformer, hard_gaussian: equal full_attention with the prior as a bias."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def localness(centers, sigmas, length, key_length):
    j = numpy.arange(key_length)
    return -((j - centers[..., None]) ** 2) / (2 * sigmas[..., None] ** 2) * numpy.ones((length, 1))


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_gaussian_prior_equals_full_with_bias(backend, implementation, causal, small_tiles):
    q, k, v = qkv_host(0, length=7, key_length=10)
    centers = random.uniform((2, 4, 7), seed=3, high=9.0)
    sigmas = random.uniform((1, 4, 1), seed=4, low=0.3, high=3.0)
    got = reflex.gaussian_prior_attention(*(backend.asarray(a) for a in (q, k, v)), centers=backend.asarray(centers),
                                          sigmas=backend.asarray(sigmas), causal=causal, return_lse=True,
                                          implementation=implementation)
    ref = reflex.full_attention(q, k, v, bias=localness(centers, sigmas, 7, 10), causal=causal, return_lse=True)
    assert max_abs(backend.to_numpy(got[0]), ref[0]) <= 1e-13
    assert max_abs(backend.to_numpy(got[1]), ref[1]) <= 1e-13


def test_gaussian_prior_windows_rule_and_errors():
    q, k, v = qkv_host(1, length=5, key_length=5)
    centers, windows = numpy.arange(5.0), numpy.full((5,), 4.0)
    by_window = reflex.gaussian_prior_attention(q, k, v, centers=centers, windows=windows)
    assert max_abs(by_window, reflex.gaussian_prior_attention(q, k, v, centers=centers, sigmas=windows / 2)) == 0.0
    rho = reflex.gaussian_prior_attention(q, k, v, centers=centers, windows=windows, sigma_per_window=0.25)
    assert max_abs(rho, reflex.gaussian_prior_attention(q, k, v, centers=centers, sigmas=windows / 4)) == 0.0
    with pytest.raises(ValueError, match="exactly one"):
        reflex.gaussian_prior_attention(q, k, v, centers=centers)
    with pytest.raises(ValueError, match="does not broadcast"):
        reflex.gaussian_prior_attention(q, k, v, centers=numpy.zeros(4), sigmas=windows)


def test_gaussian_prior_narrow_width_picks_the_centre():
    q, k, v = qkv_host(2, length=4, key_length=6)
    centers = numpy.array([0.0, 5.0, 2.0, 3.0])
    out = reflex.gaussian_prior_attention(q, k, v, centers=centers, sigmas=numpy.full(4, 1e-3))
    expected = numpy.repeat(v, 2, axis=-3)[..., [0, 5, 2, 3], :]
    assert max_abs(out, expected) < 1e-13


@given(w=st.floats(0.0, 2.0), b=st.floats(-3.0, 3.0), length=st.integers(1, 6), key_length=st.integers(1, 6))
def test_gaussian_transformer_equals_full_with_bias(w, b, length, key_length):
    q, k, v = qkv_host(3, length=length, key_length=key_length)
    d = numpy.arange(length)[:, None] - numpy.arange(key_length)[None, :]
    ref = reflex.full_attention(q, k, v, bias=-numpy.abs(w * d ** 2 + b), causal=True)
    got = reflex.gaussian_transformer_attention(q, k, v, w=w, b=b, causal=True)
    assert max_abs(got, ref) <= 1e-13


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_gaussian_transformer_per_head_on_every_backend(backend, implementation, small_tiles):
    q, k, v = qkv_host(4, length=8, key_length=11)
    w, b = random.uniform((4,), seed=1), random.normal((4,), seed=2)
    d = numpy.arange(8)[:, None] - numpy.arange(11)[None, :]
    ref = reflex.full_attention(q, k, v, bias=-numpy.abs(w[:, None, None] * d ** 2 + b[:, None, None]))
    got = reflex.gaussian_transformer_attention(*(backend.asarray(a) for a in (q, k, v)), w=backend.asarray(w),
                                                b=backend.asarray(b), implementation=implementation)
    assert max_abs(backend.to_numpy(got), ref) <= 1e-13
    with pytest.raises(ValueError, match="one value per head"):
        reflex.gaussian_transformer_attention(q, k, v, w=[1.0, 2.0, 3.0], b=0.0)


def hard_reference(v, heads, length, offsets, sigmas, causal=False):
    """Normalised Gaussian densities on the host, multiplied by v (kv heads repeated)."""
    key_length = v.shape[-2]
    v = numpy.repeat(v, heads // v.shape[-3], axis=-3)
    i, j = numpy.arange(length)[:, None], numpy.arange(key_length)[None, :]
    o, s = numpy.reshape(offsets, (-1, 1, 1)), numpy.reshape(sigmas, (-1, 1, 1))
    dens = numpy.exp(-((j - i - o) ** 2) / (2 * s ** 2)) * numpy.ones((heads, 1, 1))
    if causal:
        dens = dens * (j <= i)
    return (dens / dens.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_hard_gaussian_is_a_normalised_density(backend, implementation, small_tiles):
    q, k, v = qkv_host(5, length=7, key_length=9)
    offsets, sigmas = [-1, 1, 0, 3], [1.0, 0.7, 2.0, 1.0]
    got = reflex.hard_gaussian_attention(*(backend.asarray(a) for a in (q, k, v)), offsets=offsets, sigmas=sigmas,
                                         implementation=implementation)
    assert max_abs(backend.to_numpy(got), hard_reference(v, 4, 7, offsets, sigmas)) < 1e-14
    causal = reflex.hard_gaussian_attention(q, k, v, offsets=-1, causal=True)
    assert max_abs(causal, hard_reference(v, 4, 7, [-1], [1.0], causal=True)) < 1e-14


def test_hard_gaussian_ignores_query_and_key_values():
    q, k, v = qkv_host(6, length=3, key_length=3)
    a = reflex.hard_gaussian_attention(q, k, v)
    b = reflex.hard_gaussian_attention(numpy.full_like(q, numpy.inf), numpy.full_like(k, numpy.nan), v)
    assert max_abs(a, b) == 0.0
    narrow = reflex.hard_gaussian_attention(q, k, v, offsets=1, sigmas=1e-3)  # each query copies v_{i+1}; the last v_2
    assert max_abs(narrow, numpy.repeat(v, 2, axis=-3)[..., [1, 2, 2], :]) < 1e-13


def test_zero_or_negative_widths_rejected():
    """σ = 0 would give −(0·∞) = NaN scores at the centre; widths must be > 0."""
    q, k, v = qkv_host(7, length=4, key_length=5)
    centers = numpy.zeros(4)
    for bad in (0.0, -1.0, numpy.nan):
        with pytest.raises(ValueError, match="sigmas must be > 0"):
            reflex.hard_gaussian_attention(q, k, v, sigmas=bad)
        with pytest.raises(ValueError, match="sigmas must be > 0"):
            reflex.gaussian_prior_attention(q, k, v, centers=centers, sigmas=numpy.array([1.0, bad, 1.0, 1.0]))
    with pytest.raises(ValueError, match="sigma_per_window \\* windows must be > 0"):
        reflex.gaussian_prior_attention(q, k, v, centers=centers, windows=numpy.ones(4), sigma_per_window=0.0)


def test_priors_inside_multi_head():
    x = random.normal((1, 5, 8), seed=0)
    ws = [random.normal(s, seed=i) for i, s in enumerate([(8, 8), (8, 8), (8, 8), (8, 8)])]
    got = reflex.multi_head_attention(x, *ws, num_heads=4, mechanism="hard_gaussian",
                                      mechanism_params={"offsets": [-1, 1, 0, 0]})
    v = numpy.moveaxis((x @ ws[2]).reshape(1, 5, 4, 2), -2, -3)
    heads = hard_reference(v, 4, 5, [-1, 1, 0, 0], [1.0])
    assert max_abs(got, numpy.moveaxis(heads, -3, -2).reshape(1, 5, 8) @ ws[3]) < 1e-13
