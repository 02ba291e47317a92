"""routing_attention and the shared k-means: pattern by hand, full attention restricted to it, limits."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from reflex.backends import numpy_namespace
from reflex.mechanisms import _kmeans
from tests.helpers import max_abs, qkv_host


def unit(x):
    n = numpy.linalg.norm(x, axis=-1, keepdims=True)
    return x / numpy.where(n > 0, n, 1)


def host_pattern(q, k, centroids, window=None):
    r = q.shape[-3] // k.shape[-3]
    mu = unit(numpy.broadcast_to(centroids, (q.shape[-3], *centroids.shape[-2:])))
    sq = numpy.einsum("hcd,...hld->...hcl", mu, unit(q))
    sk = numpy.einsum("hcd,...hsd->...hcs", mu, unit(numpy.repeat(k, r, axis=-3)))
    if window is None:
        mq = numpy.argmax(sq, axis=-2)[..., None, :] == numpy.arange(mu.shape[-2])[:, None]
        mk = numpy.argmax(sk, axis=-2)[..., None, :] == numpy.arange(mu.shape[-2])[:, None]
    else:
        mq, mk = numpy.zeros(sq.shape, bool), numpy.zeros(sk.shape, bool)
        numpy.put_along_axis(mq, numpy.argsort(-sq, axis=-1, kind="stable")[..., :window], True, axis=-1)
        numpy.put_along_axis(mk, numpy.argsort(-sk, axis=-1, kind="stable")[..., :window], True, axis=-1)
    return numpy.einsum("...cl,...cs->...ls", mq.astype(int), mk.astype(int)) > 0


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_equals_full_restricted_on_every_backend(backend, window, causal):
    q, k, v = qkv_host(1, length=7, key_length=10)
    centroids = random.normal((4, 3, 5), seed=2)
    out, lse = reflex.routing_attention(*(backend.asarray(a) for a in (q, k, v)), num_clusters=3,
                                        centroids=backend.asarray(centroids), window=window, causal=causal,
                                        return_lse=True)
    pattern = host_pattern(q, k, centroids, window)
    if causal:
        pattern = pattern & (numpy.arange(10)[None, :] <= numpy.arange(7)[:, None] + 3)
    numpy.testing.assert_array_equal(reflex.routing_pattern(q, k, num_clusters=3, centroids=centroids, window=window,
                                                            causal=causal), pattern)
    ref, ref_lse = reflex.full_attention(q, k, v, mask=pattern, return_lse=True)
    assert max_abs(backend.to_numpy(out), ref) <= 1e-13 and max_abs(backend.to_numpy(lse), ref_lse) <= 1e-13


@pytest.mark.parametrize("causal", [False, "top_left"])
def test_one_cluster_equals_full(backend, causal):
    q, k, v = qkv_host(3, length=6, key_length=8)
    args = [backend.asarray(a) for a in (q, k, v)]
    ref = reflex.full_attention(q, k, v, causal=causal)
    a = reflex.routing_attention(*args, num_clusters=1, iterations=2, seed=0, causal=causal)
    b = reflex.routing_attention(*args, num_clusters=1, centroids=backend.asarray(numpy.ones((1, 5))), window=8, causal=causal)
    assert max_abs(backend.to_numpy(a), ref) <= 1e-14 and max_abs(backend.to_numpy(b), ref) <= 1e-14


def test_kmeans_clusters_identical_across_backends(backend):
    q, k, _ = qkv_host(4, length=9, key_length=12)
    want = reflex.routing_clusters(q, k, num_clusters=3, iterations=4, seed=5)
    got = reflex.routing_clusters(backend.asarray(q), backend.asarray(k), num_clusters=3, iterations=4, seed=5)
    for a, b in zip(want, got):
        numpy.testing.assert_array_equal(backend.to_numpy(b), a)
    assert want[0].shape == (2, 4, 3, 9) and numpy.all(want[0].sum(axis=-2) == 1)


def test_kmeans_by_hand():
    xp = numpy_namespace()
    x = numpy.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.2], [2.5, 2.5]])
    init = numpy.array([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]])  # third cluster stays empty
    out = _kmeans.kmeans(x, init=init, iterations=3)
    # point 4 is equidistant from neither; assignments converge to {0,1,4} and {2,3}
    numpy.testing.assert_allclose(out[0], x[[0, 1, 4]].mean(0), rtol=0, atol=1e-15)
    numpy.testing.assert_allclose(out[1], x[[2, 3]].mean(0), rtol=0, atol=1e-15)
    assert numpy.all(out[2] == init[2])  # empty cluster keeps its centroid
    tie = _kmeans.assign(numpy.array([[1.0, 0.0]]), numpy.array([[0.0, 0.0], [2.0, 0.0]]))
    assert tie[0] == 0  # equidistant: lower index
    assert _kmeans.assign(numpy.array([[1.0, 0.0]]), numpy.array([[0.0, 1.0], [0.0, -1.0]]), metric="cosine")[0] == 0
    assert xp is not None
    picks = _kmeans.initial_centroids(x, 3, seed=1)
    assert picks.shape == (3, 2) and len({tuple(r) for r in picks}) == 3
    with pytest.raises(ValueError, match="metric must be one of"):
        _kmeans.assign(x, init, metric="manhattan")


def test_errors():
    q, k, v = qkv_host(6)
    with pytest.raises(ValueError, match="pass centroids=, or iterations= and seed="):
        reflex.routing_attention(q, k, v, num_clusters=2)
    with pytest.raises(ValueError, match="not both"):
        reflex.routing_attention(q, k, v, num_clusters=2, centroids=numpy.ones((2, 5)), seed=1)
    with pytest.raises(ValueError, match=r"centroids must have shape \(C, D\) = \(2, 5\)"):
        reflex.routing_attention(q, k, v, num_clusters=2, centroids=numpy.ones((3, 5)))
    with pytest.raises(ValueError, match="window must be None or an int >= 1"):
        reflex.routing_attention(q, k, v, num_clusters=2, centroids=numpy.ones((2, 5)), window=0)
