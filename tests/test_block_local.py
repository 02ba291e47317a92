"""block_local_attention: equals full_attention with the block mask (partial blocks, look-back, causal)."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from tests.helpers import max_abs, qkv_host


def block_mask(length, key_length, block, look_back=0, causal=False, offset=0):
    """Host loops over explicit block index sets."""
    mask = numpy.zeros((length, key_length), dtype=bool)
    for i in range(length):
        a = i + offset
        qb = a // block
        for j in range(key_length):
            if qb - look_back <= j // block <= qb and (not causal or j <= a):
                mask[i, j] = True
    return mask


def check(backend, q, k, v, implementation, **params):
    args = [backend.asarray(a) for a in (q, k, v)]
    out, lse = reflex.block_local_attention(*args, **params, implementation=implementation, return_lse=True)
    offset = k.shape[-2] - q.shape[-2] if params.get("alignment") == "bottom_right" else 0
    mask = block_mask(q.shape[-2], k.shape[-2], params["block_size"], params.get("look_back", 0),
                      params.get("causal", False), offset)
    ref = reflex.full_attention(q, k, v, mask=mask, return_lse=True, implementation="dense")
    assert max_abs(backend.to_numpy(out), ref[0]) <= 1e-13
    assert max_abs(backend.to_numpy(lse), ref[1]) <= 1e-13


@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled"])
@pytest.mark.parametrize("params", [dict(block_size=3), dict(block_size=4, look_back=1, causal=True),
                                    dict(block_size=5, alignment="bottom_right"), dict(block_size=20)])
def test_equals_full_with_mask(backend, implementation, params):
    q, k, v = qkv_host(1, length=10, key_length=13)  # 3, 4, 5 do not divide 10 or 13
    check(backend, q, k, v, implementation, **params)


def test_block_one_is_self_and_block_ge_s_is_full():
    q, k, v = qkv_host(2, length=6, key_length=6, kv_heads=4)
    assert max_abs(reflex.block_local_attention(q, k, v, block_size=1), v) <= 1e-15
    assert max_abs(reflex.block_local_attention(q, k, v, block_size=6), reflex.full_attention(q, k, v)) <= 1e-13
    causal = reflex.block_local_attention(q, k, v, block_size=8, causal=True)
    assert max_abs(causal, reflex.full_attention(q, k, v, causal=True)) <= 1e-13


def test_pattern_record():
    q, k, v = qkv_host(3, length=7, key_length=9)
    pattern = reflex.get("block_local").pattern(q, k, v, block_size=2, look_back=1, alignment="bottom_right")
    numpy.testing.assert_array_equal(pattern[0, 1], block_mask(7, 9, 2, 1, False, 2))


@given(length=st.integers(1, 20), key_length=st.integers(1, 20), block=st.integers(1, 8), look_back=st.integers(0, 2),
       causal=st.booleans(), alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_hypothesis(length, key_length, block, look_back, causal, alignment):
    from tests.conftest import make_backend

    q, k, v = qkv_host(4, length=length, key_length=key_length)
    for implementation in ("numba", "tiled"):
        check(make_backend("numpy"), q, k, v, implementation, block_size=block, look_back=look_back, causal=causal,
              alignment=alignment)


def test_errors():
    q, k, v = qkv_host(5)
    with pytest.raises(ValueError, match="block_size"):
        reflex.block_local_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="look_back"):
        reflex.block_local_attention(q, k, v, block_size=2, look_back=-1)
    with pytest.raises(ValueError, match="causal"):
        reflex.block_local_attention(q, k, v, block_size=2, causal="yes")
    with pytest.raises(ValueError, match="gather"):
        reflex.block_local_attention(q, k, v, block_size=2, implementation="gather")
