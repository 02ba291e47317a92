"""shared_map_attention: the map of full reproduces full's output; GQA; any map; errors."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host, softmax_map


@pytest.mark.parametrize("causal", [False, True])
def test_map_of_full_reproduces_full(backend, causal):
    q, k, v = qkv_host(0, length=5, key_length=8)
    got = reflex.shared_map_attention(backend.asarray(softmax_map(q, k, causal)), backend.asarray(v))
    assert max_abs(backend.to_numpy(got), reflex.full_attention(q, k, v, causal=causal)) <= 1e-13


def test_reuse_across_layers_and_any_map(backend):
    """LazyFormer: layer 1 computes the map, layer 2 reuses it with its own values."""
    q, k, _ = qkv_host(1, length=4, key_length=4, kv_heads=4)
    a = softmax_map(q, k)
    v2 = random.normal((2, 2, 4, 3), seed=5)
    got = backend.to_numpy(reflex.shared_map_attention(backend.asarray(a), backend.asarray(v2)))
    assert max_abs(got, a @ numpy.repeat(v2, 2, axis=-3)) <= 1e-14
    weights = random.uniform((3, 1, 2), seed=6)  # unbatched, unnormalised: H = 3, L = 1, S = 2; MQA values
    values = random.normal((1, 2, 4), seed=7)
    single = reflex.shared_map_attention(weights, values)
    assert single.shape == (3, 1, 4) and max_abs(single, weights @ values) <= 1e-15


def test_errors():
    with pytest.raises(ValueError, match="not a multiple"):
        reflex.shared_map_attention(numpy.ones((1, 3, 2, 2)), numpy.ones((1, 2, 2, 1)))
    with pytest.raises(ValueError, match="v must have shape"):
        reflex.shared_map_attention(numpy.ones((1, 2, 2, 2)), numpy.ones((1, 2, 3, 1)))
