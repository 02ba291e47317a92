"""random_attention: explicit or seeded key lists; equals full_attention with the lists as a mask."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def list_mask(indices, key_length):
    mask = numpy.zeros((*indices.shape[:-1], key_length), dtype=bool)
    numpy.put_along_axis(mask, indices, True, axis=-1)
    return mask


@pytest.mark.parametrize("implementation", ["auto", "gather", "dense", "tiled"])
def test_equals_full_with_mask(backend, implementation):
    q, k, v = qkv_host(1, length=7, key_length=10)
    indices = random.choice((2, 4, 7), seed=2, population=10, count=3)
    out, lse = reflex.random_attention(*[backend.asarray(a) for a in (q, k, v)], indices=backend.asarray(indices),
                                       implementation=implementation, return_lse=True)
    ref = reflex.full_attention(q, k, v, mask=list_mask(indices, 10), return_lse=True, implementation="dense")
    assert max_abs(backend.to_numpy(out), ref[0]) <= 1e-13 and max_abs(backend.to_numpy(lse), ref[1]) <= 1e-13


def test_seed_is_deterministic_and_equals_explicit_draw(backend):
    q, k, v = qkv_host(3, length=5, key_length=8)
    args = [backend.asarray(a) for a in (q, k, v)]
    out = reflex.random_attention(*args, num_random=3, seed=(7, 1))
    drawn = random.choice((2, 4, 5), seed=(7, 1), population=8, count=3)
    ref = reflex.random_attention(q, k, v, indices=drawn)
    assert max_abs(backend.to_numpy(out), ref) <= 1e-15
    pattern = reflex.get("random").pattern(q, k, v, num_random=3, seed=(7, 1))
    numpy.testing.assert_array_equal(pattern, list_mask(drawn, 8))


def test_edges():
    q, k, v = qkv_host(4, length=1, key_length=1)
    assert max_abs(reflex.random_attention(q, k, v, num_random=1, seed=0), reflex.full_attention(q, k, v)) <= 1e-15
    q, k, v = qkv_host(4, length=4, key_length=6)
    out, lse = reflex.random_attention(q, k, v, num_random=0, seed=0, return_lse=True)
    assert numpy.all(out == 0) and numpy.all(lse == -numpy.inf)
    every = reflex.random_attention(q, k, v, num_random=6, seed=0)
    assert max_abs(every, reflex.full_attention(q, k, v)) <= 1e-13


@given(length=st.integers(1, 10), key_length=st.integers(1, 10), data=st.data(), seed=st.integers(0, 99))
def test_hypothesis(length, key_length, data, seed):
    r = data.draw(st.integers(0, key_length))
    q, k, v = qkv_host(seed, length=length, key_length=key_length)
    indices = random.choice((4, length), seed=seed, population=key_length, count=r)
    ref = reflex.full_attention(q, k, v, mask=list_mask(indices, key_length), return_lse=True)
    for implementation in ("gather", "tiled"):
        out = reflex.random_attention(q, k, v, indices=indices, implementation=implementation, return_lse=True)
        assert max_abs(out[0], ref[0]) <= 1e-13 and max_abs(out[1], ref[1]) <= 1e-13


def test_errors():
    q, k, v = qkv_host(5, length=3, key_length=4)
    with pytest.raises(ValueError, match="exactly one"):
        reflex.random_attention(q, k, v, num_random=2)
    with pytest.raises(ValueError, match="distinct"):
        reflex.random_attention(q, k, v, indices=numpy.array([[0, 0]] * 3))
    with pytest.raises(ValueError, match="exceeds"):
        reflex.random_attention(q, k, v, num_random=5, seed=0)
    with pytest.raises(ValueError, match="num_random says"):
        reflex.random_attention(q, k, v, indices=numpy.array([[0, 1]] * 3), num_random=3)
    with pytest.raises(ValueError, match="must lie in"):
        reflex.random_attention(q, k, v, indices=numpy.array([[0, 4]] * 3))
