"""linear_attention: textbook formula on every backend, three forms agree, blocks, eps, memory, errors."""

from __future__ import annotations

import tracemalloc

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from reflex.mechanisms import _kernels, linear
from tests.helpers import max_abs, qkv_host

FORMS = ["parallel", "recurrent", "quadratic"]


def elu1(x):
    return numpy.where(x > 0, x + 1, numpy.exp(numpy.minimum(x, 0)))


def naive(q, k, v, *, offset=None, eps=1e-6, phi=elu1):
    """Katharopoulos eq. 4 with an explicit (L, S) kernel matrix; causal: keys j <= i + offset."""
    r = q.shape[-3] // k.shape[-3]
    k, v = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    a = phi(q) @ numpy.swapaxes(phi(k), -1, -2)
    if offset is not None:
        a = a * (numpy.arange(k.shape[-2])[None, :] <= numpy.arange(q.shape[-2])[:, None] + offset)
    return (a @ v) / (a.sum(-1, keepdims=True) + eps)


def offset_of(causal, length, key_length):
    return None if not causal else 0 if causal in (True, "top_left") else key_length - length


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("shape", [(7, 11), (11, 4)])
def test_matches_naive_on_every_backend(backend, form, causal, shape):
    q, k, v = qkv_host(1, length=shape[0], key_length=shape[1])
    out = reflex.linear_attention(*(backend.asarray(a) for a in (q, k, v)), causal=causal, implementation=form)
    got = backend.to_numpy(out)
    assert got.dtype == numpy.float64 and got.shape == (2, 4, shape[0], 3)
    assert max_abs(got, naive(q, k, v, offset=offset_of(causal, *shape))) < 1e-14


@given(length=st.integers(1, 12), key_length=st.integers(1, 12), block=st.integers(1, 5),
       alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_recurrent_equals_parallel_prefix_sums(length, key_length, block, alignment):
    """The RNN form (one key at a time) and the blocked prefix-sum form agree to <= 1e-12."""
    q, k, v = qkv_host(2, length=length, key_length=key_length)
    p = _kernels.prepare(q, k, v)
    qg, kg, _ = linear.grouped(p)
    phi = linear._elu_plus_one(p.xp)
    offset = offset_of(alignment, length, key_length)
    outs = [linear._kernelized(p, lambda i0, i1: phi(qg[..., i0:i1, :]), lambda j0, j1: phi(kg[..., j0:j1, :]),
                               lambda n, d: n / (d + 1e-6), offset=offset, form=form, block=block) for form in FORMS]
    assert max_abs(outs[0], outs[1]) <= 1e-12
    assert max_abs(outs[0], outs[2]) <= 1e-12
    assert max_abs(outs[0], naive(q, k, v, offset=offset)) <= 1e-12


def test_queries_before_the_first_key_output_zero():
    q, k, v = qkv_host(3, length=9, key_length=4)
    for form in FORMS:
        out = reflex.linear_attention(q, k, v, causal="bottom_right", implementation=form)
        assert numpy.all(out[..., :5, :] == 0) and numpy.all(numpy.isfinite(out))


def test_eps_is_explicit_and_used():
    q, k, v = qkv_host(4)
    for eps in (0.0, 1e-6, 0.5):
        assert max_abs(reflex.linear_attention(q, k, v, eps=eps), naive(q, k, v, eps=eps)) < 1e-14
    assert max_abs(reflex.linear_attention(q, k, v, eps=0.5), reflex.linear_attention(q, k, v)) > 1e-3


def test_relu_and_callable_feature_maps():
    q, k, v = qkv_host(5)
    relu = lambda x: numpy.maximum(x, 0)  # noqa: E731
    assert max_abs(reflex.linear_attention(q, k, v, feature_map="relu"), naive(q, k, v, phi=relu)) < 1e-14
    square = lambda x: x * x  # noqa: E731  (a callable works in the caller's namespace)
    got = reflex.linear_attention(q, k, v, feature_map=square, causal=True, implementation="recurrent")
    assert max_abs(got, naive(q, k, v, offset=0, phi=square)) < 1e-13


def test_single_query_and_key_and_no_batch_axes():
    q, k, v = qkv_host(6, batch=(), length=1, key_length=1)
    for causal in (False, True):
        for form in FORMS:
            # one key: the output is that key's value (up to the eps in the normaliser)
            out = reflex.linear_attention(q, k, v, causal=causal, implementation=form, eps=0.0)
            assert max_abs(out, numpy.repeat(v, 2, axis=-3)) < 1e-15


def test_gqa_equals_repeated_heads():
    q, k, v = qkv_host(7)
    repeated = [numpy.repeat(a, 2, axis=-3) for a in (k, v)]
    for causal in (False, "bottom_right"):
        assert max_abs(reflex.linear_attention(q, k, v, causal=causal),
                       reflex.linear_attention(q, *repeated, causal=causal)) == 0.0


def test_compute_dtype_float32():
    q, k, v = qkv_host(8)
    out = reflex.linear_attention(q, k, v, compute_dtype="float32", causal=True)
    assert out.dtype == numpy.float32 and max_abs(out, naive(q, k, v, offset=0)) < 1e-5


def _peak(length, form):
    q, k, v = qkv_host(9, batch=(1,), heads=1, kv_heads=1, length=length, key_length=length, dim=4, value_dim=4)
    tracemalloc.start()
    try:
        reflex.linear_attention(q, k, v, causal=True, implementation=form)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("form", ["parallel", "recurrent"])
def test_causal_memory_is_linear_in_length(form):
    """Neither causal form materialises L x S: doubling L at most ~doubles the peak."""
    small, large = _peak(1024, form), _peak(2048, form)
    assert large < 2.6 * small
    assert large < 0.1 * 2048 * 2048 * 8


def test_errors_name_the_argument():
    q, k, v = qkv_host(10)
    with pytest.raises(ValueError, match="feature_map"):
        reflex.linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="eps"):
        reflex.linear_attention(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="implementation"):
        reflex.linear_attention(q, k, v, implementation="tiled")
    with pytest.raises(ValueError, match="causal"):
        reflex.linear_attention(q, k, v, causal="left")


def test_zero_eps_and_zero_normaliser_give_zero_not_nan():
    """relu features of an all-negative query sum to 0 against every key: with eps = 0 the row
    attends nothing and outputs 0 (the engine's convention), never 0/0 = NaN."""
    q, k, v = qkv_host(21, length=3, key_length=4)
    q = -numpy.abs(q)
    out = reflex.linear_attention(q, numpy.abs(k), v, feature_map="relu", eps=0.0)
    assert numpy.all(out == 0.0)
