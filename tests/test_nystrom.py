"""nystrom_attention: textbook formula on every backend, limits (m = S exact → full; iterative → exact), errors."""

from __future__ import annotations

import math

import numpy
import pytest

import reflex
from reflex.mechanisms import nystrom
from tests.helpers import max_abs, qkv_host


def softmax(s):
    w = numpy.exp(s - s.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


def segments(x, m):
    n = x.shape[-2]
    return numpy.stack([x[..., (r * n) // m:((r + 1) * n) // m, :].mean(-2) for r in range(m)], axis=-2)


def naive(q, k, v, m, *, pinv="exact", eps=1e-6):
    """Xiong 2021 eq. 14–16 with NumPy's pinv / inv, GQA by repeating kv heads."""
    r = q.shape[-3] // k.shape[-3]
    k, v = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    root = q.shape[-1] ** -0.25
    q, k = q * root, k * root
    ql, kl = segments(q, m), segments(k, m)
    t = lambda x: numpy.swapaxes(x, -1, -2)  # noqa: E731
    a = softmax(ql @ t(kl))
    inverse = numpy.linalg.pinv(a) if pinv == "exact" else numpy.linalg.inv(a + eps * numpy.eye(m))
    return softmax(q @ t(kl)) @ inverse @ (softmax(ql @ t(k)) @ v)


@pytest.mark.parametrize("pinv", ["exact", "regularized"])
@pytest.mark.parametrize("shape,m", [((8, 12), 4), ((9, 7), 3), ((5, 11), 5)])
def test_matches_textbook_formula_on_every_backend(backend, pinv, shape, m):
    q, k, v = qkv_host(1, length=shape[0], key_length=shape[1])
    out = reflex.nystrom_attention(*(backend.asarray(a) for a in (q, k, v)), num_landmarks=m, pinv=pinv, eps=1e-2)
    expected = naive(q, k, v, m, pinv=pinv, eps=1e-2)
    assert max_abs(backend.to_numpy(out), expected) < 1e-11 * max(1.0, numpy.abs(expected).max())


def test_iterative_on_every_backend_matches_reference_order(backend):
    q, k, v = qkv_host(2, length=8, key_length=12)
    args = [backend.asarray(a) for a in (q, k, v)]
    out = backend.to_numpy(reflex.nystrom_attention(*args, num_landmarks=4))
    assert max_abs(out, nystrom._reference(q, k, v, num_landmarks=4)) < 1e-12


@pytest.mark.parametrize("length,key_length", [(8, 8), (12, 8), (16, 4)])
def test_as_many_landmarks_as_keys_with_exact_pinv_is_full(length, key_length):
    """m = S: key landmarks are the keys, A is invertible, F·A⁺·A·V = softmax(QKᵀ)V."""
    q, k, v = qkv_host(3, length=length, key_length=key_length, dim=8)
    out = reflex.nystrom_attention(q, k, v, num_landmarks=key_length, pinv="exact")
    assert max_abs(out, reflex.full_attention(q, k, v)) <= 1e-12


def test_iterative_approaches_exact_as_iterations_grow():
    q, k, v = qkv_host(4, length=16, key_length=16, dim=8)
    exact = reflex.nystrom_attention(q, k, v, num_landmarks=4, pinv="exact")
    errors = [max_abs(reflex.nystrom_attention(q, k, v, num_landmarks=4, iterations=n), exact) for n in (2, 6, 10, 14, 20, 30)]
    assert all(b <= a * 1.01 + 1e-13 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-3 and errors[-1] < 1e-11, errors


def test_regularized_approaches_exact_as_eps_shrinks():
    q, k, v = qkv_host(5, length=8, key_length=8, dim=8)
    exact = reflex.nystrom_attention(q, k, v, num_landmarks=4, pinv="exact")
    errors = [max_abs(reflex.nystrom_attention(q, k, v, num_landmarks=4, pinv="regularized", eps=e), exact)
              for e in (1e-2, 1e-5, 1e-8)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5, errors


def test_batch_init_couples_items_matrix_init_does_not():
    q, k, v = qkv_host(6, length=8, key_length=8)
    for init, coupled in (("matrix", False), ("batch", True)):
        together = reflex.nystrom_attention(q, k, v, num_landmarks=4, pinv_init=init)
        alone = reflex.nystrom_attention(q[:1], k[:1], v[:1], num_landmarks=4, pinv_init=init)
        assert (max_abs(together[:1], alone) > 1e-12) == coupled


def test_tiled_engine_equals_dense_and_gqa_equals_repeated_heads():
    q, k, v = qkv_host(7, length=10, key_length=14)
    dense = reflex.nystrom_attention(q, k, v, num_landmarks=5, implementation="dense")
    assert max_abs(dense, reflex.nystrom_attention(q, k, v, num_landmarks=5, implementation="tiled")) < 1e-12
    repeated = [numpy.repeat(a, 2, axis=-3) for a in (k, v)]
    assert max_abs(dense, reflex.nystrom_attention(q, *repeated, num_landmarks=5)) < 1e-12


def test_uneven_segments_are_means():
    x = numpy.arange(14.0).reshape(1, 7, 2)
    got = nystrom.segment_means(reflex.backends.numpy_namespace(), x, 3)
    assert numpy.array_equal(got, segments(x, 3))


def test_single_landmark_single_key():
    q, k, v = qkv_host(8, length=1, key_length=1)
    out = reflex.nystrom_attention(q, k, v, num_landmarks=1, pinv="exact")
    assert max_abs(out, numpy.repeat(v, 2, axis=-3)) < 1e-14
    assert math.isfinite(float(numpy.max(out)))


def test_errors():
    q, k, v = qkv_host(9, length=6, key_length=9)
    with pytest.raises(ValueError, match=r"num_landmarks must be an int in \[1, min\(L, S\)\] = \[1, 6\]"):
        reflex.nystrom_attention(q, k, v, num_landmarks=7)
    with pytest.raises(ValueError, match="pinv must be"):
        reflex.nystrom_attention(q, k, v, num_landmarks=2, pinv="svd")
    with pytest.raises(ValueError, match="pinv_init"):
        reflex.nystrom_attention(q, k, v, num_landmarks=2, pinv_init="global")
    with pytest.raises(ValueError, match="iterations"):
        reflex.nystrom_attention(q, k, v, num_landmarks=2, iterations=-1)
