"""Numba bucketing kernels against the array-API path: indices identical, outputs ≤ 1e-13."""

from __future__ import annotations

import importlib

import numpy
import pytest

from reflex import random
from reflex.backends import numpy_namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms import lsh as lsh_module
from tests.helpers import max_abs

bucketing = importlib.import_module("reflex.backends.numba_kernels.bucketing")
xp = numpy_namespace()


@pytest.mark.parametrize("factors", [(2,), (8,), (2, 4), (4, 2, 2), (1,)])
def test_hash_identical(factors):
    x = random.normal((3, 2, 37, 6), seed=1)
    half = sum(f // 2 for f in factors) if factors != (1,) else 0
    rot = random.normal((2, 6, 3, half), seed=2)
    numpy.testing.assert_array_equal(bucketing.hash_vectors(x, rot, factors), lsh_module._hash(xp, x, rot, factors))
    ties = numpy.zeros((1, 2, 4, 6))  # every projection 0: first index
    assert numpy.all(bucketing.hash_vectors(ties, rot, factors) == 0)


def test_counting_sort_is_the_stable_argsort():
    buckets = random.integers((4, 3, 50), seed=3, low=0, high=7)
    numpy.testing.assert_array_equal(bucketing.counting_sort(buckets, 7), numpy.argsort(buckets, axis=-1, kind="stable"))
    numpy.testing.assert_array_equal(bucketing.counting_sort(buckets, 7), lsh_module.lsh_sort(buckets))
    constant = numpy.full((2, 9), 3)
    numpy.testing.assert_array_equal(bucketing.counting_sort(constant, 4), numpy.tile(numpy.arange(9), (2, 1)))


@pytest.mark.parametrize("chunk,before,after", [(4, 1, 0), (3, 2, 1), (8, 0, 0), (2, 0, 3)])
def test_chunk_windows_identical(chunk, before, after):
    order = numpy.stack([random.choice((), seed=(4, i), population=24, count=24, sort=False) for i in range(6)]).reshape(2, 3, 24)
    numpy.testing.assert_array_equal(bucketing.chunk_windows(order, chunk, before, after),
                                     lsh_module._windows(xp, order, chunk, before, after))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk,before,after,n_hashes", [(4, 1, 0, 2), (3, 1, 1, 3), (6, 2, 0, 1), (24, 0, 0, 1)])
def test_chunked_attention_matches_gather_path(causal, chunk, before, after, n_hashes):
    qk = random.normal((2, 2, 24, 5), seed=5)
    v = random.normal((2, 2, 24, 3), seed=6)
    rot = random.normal((2, 5, n_hashes, 2), seed=7)
    p = _kernels.prepare(qk, qk, v)
    plan = lsh_module._Plan((4,), n_hashes, chunk, before, after, causal, 0.4)
    out_n, lse_n = lsh_module._rounds(p, plan, rot, True)
    out_a, lse_a = lsh_module._rounds(p, plan, rot, False)
    assert max_abs(out_n, out_a) <= 1e-13 and max_abs(lse_n, lse_a) <= 1e-13
    assert out_n.shape == (2, 2, n_hashes, 24, 3) and lse_n.shape == (2, 2, n_hashes, 24)
