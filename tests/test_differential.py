"""differential: the paper's formula written out densely in NumPy, λ's limits, GQA pairing, bad inputs."""

from __future__ import annotations

import math

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs

NAMES = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def inputs(seed, *, pairs=4, kv=2, length=5, key_length=7, dim=4, value_dim=6, batch=(2,)):
    q = random.normal((*batch, 2 * pairs, length, dim), seed=(seed, 0))
    k = random.normal((*batch, 2 * kv, key_length, dim), seed=(seed, 1))
    v = random.normal((*batch, kv, key_length, value_dim), seed=(seed, 2))
    lambdas = {name: 0.3 * random.normal((dim,), seed=(seed, 3 + i)) for i, name in enumerate(NAMES)}
    return q, k, v, lambdas


def differential_by_hand(q, k, v, lambdas, lambda_init, *, weight=None, eps=1e-5, mask=None, causal_offset=None,
                         scale=None):
    """The paper's code (multihead_diffattn.py) in float64 NumPy: repeat_kv, two maps, RMSNorm."""
    pairs2, length, dim = q.shape[-3:]
    n_rep = (pairs2 // 2) // v.shape[-3]
    k = numpy.repeat(k, n_rep, axis=-3)  # repeat_kv: repeat-interleave of the 2G key heads
    v = numpy.repeat(v, n_rep, axis=-3)
    s = q @ numpy.swapaxes(k, -1, -2) * (dim ** -0.5 if scale is None else scale)
    if causal_offset is not None:
        s = numpy.where(numpy.tri(length, k.shape[-2], causal_offset, dtype=bool), s, -numpy.inf)
    if mask is not None:
        s = numpy.where(mask, s, -numpy.inf)
    m = s.max(-1, keepdims=True)
    e = numpy.exp(s - numpy.where(numpy.isfinite(m), m, 0.0))
    w = e / numpy.maximum(e.sum(-1, keepdims=True), 1e-300)
    lam = (math.exp(float(lambdas["lambda_q1"] @ lambdas["lambda_k1"]))
           - math.exp(float(lambdas["lambda_q2"] @ lambdas["lambda_k2"])) + lambda_init)
    w = w.reshape(*w.shape[:-3], pairs2 // 2, 2, length, w.shape[-1])
    a = w[..., 0, :, :] - lam * w[..., 1, :, :]
    o = a @ v
    o = o / numpy.sqrt((o ** 2).mean(-1, keepdims=True) + eps)
    if weight is not None:
        o = o * weight
    return o * (1 - lambda_init)


@pytest.mark.parametrize("pairs, kv", [(4, 4), (4, 2), (3, 1), (6, 2)])
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_matches_the_dense_formula(backend, pairs, kv, causal):
    q, k, v, lambdas = inputs(1, pairs=pairs, kv=kv)
    weight = 1 + 0.2 * random.normal((6,), seed=9)
    got = reflex.differential_attention(*(backend.asarray(a) for a in (q, k, v)), depth=2, causal=causal,
                                        norm_weight=backend.asarray(weight),
                                        **{n: backend.asarray(x) for n, x in lambdas.items()})
    offset = {False: None, "top_left": 0, "bottom_right": 7 - 5}[causal]
    ref = differential_by_hand(q, k, v, lambdas, 0.8 - 0.6 * math.exp(-0.6), weight=weight, causal_offset=offset)
    assert max_abs(backend.to_numpy(got), ref) < 1e-13


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_mask_scale_and_kernels(small_tiles, implementation):
    q, k, v, lambdas = inputs(2, length=6, key_length=9)
    mask = random.uniform((2, 8, 6, 9), seed=5) < 0.6
    mask[:, :, 0, :] = False  # a fully masked row: output 0 (eps > 0), never NaN
    got = reflex.differential_attention(q, k, v, lambda_init=0.3, mask=mask, scale=0.7, eps=1e-3,
                                        implementation=implementation, **lambdas)
    ref = differential_by_hand(q, k, v, lambdas, 0.3, mask=mask, scale=0.7, eps=1e-3)
    assert max_abs(got, ref) < 1e-13
    assert numpy.all(got[:, :, 0, :] == 0)


def test_lambda_zero_is_normalised_attention_of_the_first_map():
    q, k, v, lambdas = inputs(3, pairs=2, kv=2)
    init = reflex.differential_lambda_init(4)
    # λ = e^0 − e^{log(1 + λ_init)} + λ_init = 0
    lambdas["lambda_q1"] = numpy.zeros(4)
    lambdas["lambda_q2"] = numpy.array([math.sqrt(math.log1p(init)), 0, 0, 0])
    lambdas["lambda_k2"] = lambdas["lambda_q2"].copy()
    got = reflex.differential_attention(q, k, v, depth=4, causal=True, **lambdas)
    first = reflex.full_attention(q[:, 0::2], k[:, 0::2], v, causal=True)  # pair h: q 2h, k head 2h (H = G)
    normed = first / numpy.sqrt((first ** 2).mean(-1, keepdims=True) + 1e-5) * (1 - init)
    assert max_abs(got, normed) < 1e-14


def test_lambda_init_from_depth():
    assert reflex.differential_lambda_init(0) == pytest.approx(0.2, abs=1e-16)
    assert reflex.differential_lambda_init(10) == 0.8 - 0.6 * math.exp(-3.0)
    q, k, v, lambdas = inputs(4)
    by_depth = reflex.differential_attention(q, k, v, depth=5, **lambdas)
    by_value = reflex.differential_attention(q, k, v, lambda_init=0.8 - 0.6 * math.exp(-1.5), **lambdas)
    assert numpy.array_equal(by_depth, by_value)


def test_pairs_reading_different_key_heads():
    """H/G odd (3): pair 1 is query heads 2, 3, which read key heads 0 and 1 (repeat_kv after the split)."""
    q, k, v, lambdas = inputs(5, pairs=3, kv=1)
    got = reflex.differential_attention(q, k, v, lambda_init=0.4, **lambdas)
    swapped = k.copy()
    swapped[:, [0, 1]] = k[:, [1, 0]]
    other = reflex.differential_attention(q, swapped, v, lambda_init=0.4, **lambdas)
    assert max_abs(got, other) > 1e-3
    assert max_abs(got, differential_by_hand(q, k, v, lambdas, 0.4)) < 1e-13


@pytest.mark.parametrize("length, key_length", [(1, 1), (1, 5), (4, 1)])
def test_edges(length, key_length):
    q, k, v, lambdas = inputs(6, length=length, key_length=key_length)
    got = reflex.differential_attention(q, k, v, depth=1, causal="bottom_right", **lambdas)
    ref = differential_by_hand(q, k, v, lambdas, reflex.differential_lambda_init(1), causal_offset=key_length - length)
    assert max_abs(got, ref) < 1e-13


def test_bad_inputs():
    q, k, v, lambdas = inputs(7)
    call = reflex.differential_attention
    with pytest.raises(ValueError, match="q must have 2H heads"):
        call(q[:, :7], k, v, depth=0, **lambdas)
    with pytest.raises(ValueError, match="k must have 2G heads"):
        call(q, k[:, :3], v, depth=0, **lambdas)
    with pytest.raises(ValueError, match="not a multiple"):
        call(q[:, :6], k[:, :4], v, depth=0, **lambdas)
    with pytest.raises(ValueError, match="exactly one of depth"):
        call(q, k, v, **lambdas)
    with pytest.raises(ValueError, match="exactly one of depth"):
        call(q, k, v, depth=1, lambda_init=0.5, **lambdas)
    with pytest.raises(ValueError, match="depth must be an int"):
        call(q, k, v, depth=-1, **lambdas)
    with pytest.raises(ValueError, match=r"lambda_k2 must have shape \(D,\)"):
        call(q, k, v, depth=0, **{**lambdas, "lambda_k2": numpy.zeros(5)})
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(E,\)"):
        call(q, k, v, depth=0, norm_weight=numpy.ones(4), **lambdas)
    with pytest.raises(ValueError, match="eps must be"):
        call(q, k, v, depth=0, eps=0.0, **lambdas)
    with pytest.raises((TypeError, ValueError), match="causal must be"):
        call(q, k, v, depth=0, causal="yes", **lambdas)
    with pytest.raises(TypeError, match="lambda_q1 must be a real floating"):
        call(q, k, v, depth=0, **{**lambdas, "lambda_q1": numpy.zeros(4, dtype=numpy.int64)})


@pytest.mark.parametrize("pairs, kv, causal, implementation", [(2, 2, False, "dense"), (3, 1, "bottom_right", "tiled"),
                                                              (4, 2, True, "dense")])
def test_vjp_matches_finite_differences(small_tiles, pairs, kv, causal, implementation):
    from tests.helpers import assert_vjp_matches_finite_differences

    q, k, v, lambdas = inputs(8, pairs=pairs, kv=kv, length=4, key_length=5, dim=3, value_dim=4, batch=(1,))
    weight = 1 + 0.3 * random.normal((4,), seed=10)
    mask = random.uniform((1, 2 * pairs, 4, 5), seed=11) < 0.8
    d_out = random.normal((1, pairs, 4, 4), seed=12)
    given = {"q": q, "k": k, "v": v, **lambdas, "norm_weight": weight, "mask": mask}
    grads = assert_vjp_matches_finite_differences(
        "differential", given, d_out, params={"depth": 2, "causal": causal, "implementation": implementation},
        max_entries=40)
    assert set(grads) == {"q", "k", "v", *NAMES, "norm_weight"}


def test_vjp_on_every_backend(backend):
    q, k, v, lambdas = inputs(13, pairs=2, kv=1, length=3, key_length=4, dim=3, value_dim=4)
    d_out = random.normal((2, 2, 3, 4), seed=14)
    host = reflex.vjp("differential", {"q": q, "k": k, "v": v, **lambdas}, d_out, lambda_init=0.3, causal=True)
    moved = {name: backend.asarray(x) for name, x in {"q": q, "k": k, "v": v, **lambdas}.items()}
    got = reflex.vjp("differential", moved, backend.asarray(d_out), lambda_init=0.3, causal=True)
    for name, g in host.items():
        assert max_abs(backend.to_numpy(got[name]), g) < 1e-13
