"""clustered / improved_clustered attention: NumPy formulas on every backend, limits equal full, k-means, errors."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from reflex.mechanisms import _kmeans
from tests.helpers import max_abs, qkv_host


def softmax(s):
    w = numpy.exp(s - s.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


def centroid_probs(q, k, labels, count):
    r = q.shape[-3] // k.shape[-3]
    k = numpy.repeat(k, r, axis=-3)
    onehot = (labels[..., None] == numpy.arange(count)).astype(float)
    centroids = numpy.swapaxes(onehot, -1, -2) @ q / numpy.maximum(onehot.sum(-2), 1)[..., None]
    scores = centroids @ numpy.swapaxes(k, -1, -2) / numpy.sqrt(q.shape[-1])
    return scores, softmax(scores)


def naive_clustered(q, k, v, labels, count):
    _, a = centroid_probs(q, k, labels, count)
    out = a @ numpy.repeat(v, q.shape[-3] // k.shape[-3], axis=-3)
    return numpy.take_along_axis(out, labels[..., None], axis=-2)


def naive_improved(q, k, v, labels, count, topk):
    """Vyas eq. 9–10 with explicit per-query weight rows."""
    r = q.shape[-3] // k.shape[-3]
    kr, vr = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    scores, ac = centroid_probs(q, k, labels, count)
    order = numpy.argsort(-scores, axis=-1, kind="stable")
    in_top = numpy.zeros(scores.shape, dtype=bool)
    numpy.put_along_axis(in_top, order[..., :topk], True, axis=-1)
    ac_q = numpy.take_along_axis(ac, labels[..., None], axis=-2)
    top_q = numpy.take_along_axis(in_top, labels[..., None], axis=-2)
    exact = numpy.where(top_q, q @ numpy.swapaxes(kr, -1, -2) / numpy.sqrt(q.shape[-1]), -numpy.inf)
    mass = numpy.where(top_q, ac_q, 0).sum(-1, keepdims=True)
    weights = numpy.where(top_q, mass * softmax(exact), ac_q)
    return weights @ vr


@pytest.mark.parametrize("count", [1, 3, 5])
def test_clustered_matches_formula_on_every_backend(backend, count):
    q, k, v = qkv_host(1, length=7, key_length=9)
    labels = random.integers((2, 4, 7), seed=2, low=0, high=count)
    out = reflex.clustered_attention(*(backend.asarray(a) for a in (q, k, v)), assignment=backend.asarray(labels),
                                     num_clusters=count)
    assert max_abs(backend.to_numpy(out), naive_clustered(q, k, v, labels, count)) < 1e-14


@pytest.mark.parametrize("topk", [1, 4, 9])
def test_improved_matches_formula_on_every_backend(backend, topk):
    q, k, v = qkv_host(3, length=7, key_length=9)
    labels = random.integers((2, 4, 7), seed=4, low=0, high=3)
    out = reflex.improved_clustered_attention(*(backend.asarray(a) for a in (q, k, v)), topk=topk,
                                              assignment=backend.asarray(labels), num_clusters=3)
    assert max_abs(backend.to_numpy(out), naive_improved(q, k, v, labels, 3, topk)) < 1e-14


def test_one_query_per_cluster_is_full_attention():
    q, k, v = qkv_host(5, length=6, key_length=10)
    labels = numpy.broadcast_to(numpy.arange(6), (2, 4, 6))
    full = reflex.full_attention(q, k, v)
    assert max_abs(reflex.clustered_attention(q, k, v, assignment=labels), full) <= 1e-12
    assert max_abs(reflex.improved_clustered_attention(q, k, v, topk=3, assignment=labels), full) <= 1e-12


@pytest.mark.parametrize("count", [1, 2, 6])
def test_improved_with_topk_equal_s_is_full_attention(count):
    q, k, v = qkv_host(6, length=6, key_length=10)
    out = reflex.improved_clustered_attention(q, k, v, topk=10, num_clusters=count, seed=7)
    assert max_abs(out, reflex.full_attention(q, k, v)) <= 1e-12


def test_kmeans_assignment_is_the_shared_kmeans():
    q, k, v = qkv_host(8, length=12, key_length=5)
    init = _kmeans.initial_centroids(q, 3, seed=9)
    labels = _kmeans.assign(q, _kmeans.kmeans(q, init=init, iterations=4))
    assert max_abs(reflex.clustered_attention(q, k, v, num_clusters=3, iterations=4, seed=9),
                   reflex.clustered_attention(q, k, v, assignment=labels, num_clusters=3)) == 0.0


def test_members_share_their_centroid_output_and_empty_clusters_are_harmless():
    q, k, v = qkv_host(10, length=5, key_length=4)
    labels = numpy.zeros((2, 4, 5), dtype=numpy.int64)
    labels[..., 3:] = 4  # clusters 1..3 empty
    out = reflex.clustered_attention(q, k, v, assignment=labels, num_clusters=6)
    assert max_abs(out[..., 0, :], out[..., 2, :]) == 0.0 and max_abs(out[..., 3, :], out[..., 4, :]) == 0.0
    assert numpy.all(numpy.isfinite(out))


def test_single_query_single_key():
    q, k, v = qkv_host(11, length=1, key_length=1)
    expected = numpy.repeat(v, 2, axis=-3)
    assert max_abs(reflex.clustered_attention(q, k, v, num_clusters=1, seed=0), expected) == 0.0
    assert max_abs(reflex.improved_clustered_attention(q, k, v, topk=1, num_clusters=1, seed=0), expected) < 1e-15


def test_errors():
    q, k, v = qkv_host(12, length=5, key_length=4)
    with pytest.raises(ValueError, match="no hidden randomness"):
        reflex.clustered_attention(q, k, v, num_clusters=2)
    with pytest.raises(ValueError, match=r"assignment must have shape \(\.\.\., H, L\)"):
        reflex.clustered_attention(q, k, v, assignment=numpy.zeros((2, 4, 4), dtype=numpy.int64))
    with pytest.raises(ValueError, match=r"assignment values must lie in \[0, 2\)"):
        reflex.clustered_attention(q, k, v, assignment=numpy.full((2, 4, 5), 2), num_clusters=2)
    with pytest.raises(ValueError, match=r"num_clusters must be an int in \[1, 5\]"):
        reflex.clustered_attention(q, k, v, num_clusters=6, seed=1)
    with pytest.raises(ValueError, match=r"topk must be an int in \[1, 4\]"):
        reflex.improved_clustered_attention(q, k, v, topk=5, num_clusters=2, seed=1)
