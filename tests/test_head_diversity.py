"""head_diversity: extremes at identical / orthogonal heads, == host formulas, pattern loss zero at the pattern."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs


def cosine_host(x, per_position):
    h = x.shape[-3]
    total = numpy.zeros(x.shape[:-3])
    for i in range(h):
        for j in range(h):
            a, b = x[..., i, :, :], x[..., j, :, :]
            if per_position:
                total += ((a * b).sum(-1) / (numpy.linalg.norm(a, axis=-1) * numpy.linalg.norm(b, axis=-1))).mean(-1)
            else:
                total += (a * b).sum((-2, -1)) / (numpy.linalg.norm(a, axis=(-2, -1)) * numpy.linalg.norm(b, axis=(-2, -1)))
    return -total / h ** 2


@pytest.mark.parametrize("kind", ["subspace", "output"])
@pytest.mark.parametrize("reduce", ["flatten", "positions"])
def test_cosine_regularisers_match_host(backend, kind, reduce):
    x = random.normal((2, 3, 4, 5), seed=0)
    got = backend.to_numpy(reflex.head_diversity(backend.asarray(x), kind=kind, reduce=reduce))
    assert got.shape == (2,) and max_abs(got, cosine_host(x, reduce == "positions")) <= 1e-14


def test_extremes_identical_and_orthogonal_heads(backend):
    same = numpy.broadcast_to(random.normal((1, 1, 3, 4), seed=1), (2, 4, 3, 4)).copy()
    for kind in ("subspace", "output"):
        for reduce in ("flatten", "positions"):
            got = backend.to_numpy(reflex.head_diversity(backend.asarray(same), kind=kind, reduce=reduce))
            assert max_abs(got, numpy.full(2, -1.0)) <= 1e-15
    orthogonal = numpy.zeros((1, 4, 3, 4))
    for h in range(4):
        orthogonal[0, h, :, h] = random.normal((3,), seed=h)  # head h lives in coordinate h
    got = backend.to_numpy(reflex.head_diversity(backend.asarray(orthogonal), kind="output"))
    assert max_abs(got, numpy.full(1, -0.25)) <= 1e-15


def test_position_disagreement(backend):
    one_hot = numpy.zeros((1, 3, 2, 3))
    for h in range(3):
        one_hot[0, h, :, h] = 1.0  # heads attend disjoint keys
    got = backend.to_numpy(reflex.head_diversity(backend.asarray(one_hot), kind="position"))
    assert max_abs(got, numpy.array([-2 / 3])) <= 1e-15  # (1/H²)·Σ_h Σ A^h⊙A^h = 2 rows · 3 heads / 9
    same = numpy.broadcast_to(one_hot[:, :1], (1, 3, 2, 3))
    assert max_abs(reflex.head_diversity(same, kind="position"), numpy.array([-2.0])) <= 1e-15  # the minimum
    a = random.uniform((2, 4, 3, 5), seed=3)
    host = -numpy.einsum("bils,bjls->b", a, a) / 16
    assert max_abs(backend.to_numpy(reflex.head_diversity(backend.asarray(a), kind="position")), host) <= 1e-14


def test_pattern_loss(backend):
    a = random.uniform((2, 3, 4, 4), seed=4)
    p = numpy.broadcast_to(numpy.eye(4), (3, 4, 4))
    got = backend.to_numpy(reflex.head_diversity(backend.asarray(a), kind="pattern", patterns=backend.asarray(p)))
    assert max_abs(got, ((a - p) ** 2).sum((-3, -2, -1))) <= 1e-14
    assert numpy.all(reflex.head_diversity(a, kind="pattern", patterns=a) == 0)


def test_errors():
    x = numpy.ones((2, 3, 4))
    with pytest.raises(ValueError, match="kind must be"):
        reflex.head_diversity(x, kind="entropy")
    with pytest.raises(ValueError, match="needs patterns"):
        reflex.head_diversity(x, kind="pattern")
    with pytest.raises(ValueError, match="reduce must be"):
        reflex.head_diversity(x, kind="output", reduce="mean")
    assert reflex.head_diversity(numpy.zeros((2, 3, 4)), kind="output") == 0.0  # zero heads: cosine 0
