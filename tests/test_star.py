"""star_attention: equals full_attention with the Star-Transformer ring + relay mask."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from tests.helpers import max_abs, qkv_host


def star_mask(length, key_length, relay, ring=True, offset=0):
    mask = numpy.zeros((length, key_length), dtype=bool)
    for i in range(length):
        a = i + offset
        if a == relay:
            mask[i] = True
            continue
        neighbours = {a - 1, a, a + 1}
        if ring and 0 <= a < key_length:
            neighbours |= {(a - 1) % key_length, (a + 1) % key_length}
        for j in neighbours | {relay}:
            if 0 <= j < key_length:
                mask[i, j] = True
    return mask


def check(backend, q, k, v, implementation, **params):
    out, lse = reflex.star_attention(*map(backend.asarray, (q, k, v)), **params, implementation=implementation,
                                     return_lse=True)
    offset = k.shape[-2] - q.shape[-2] if params.get("alignment") == "bottom_right" else 0
    mask = star_mask(q.shape[-2], k.shape[-2], params.get("relay", 0), params.get("ring", True), offset)
    ref = reflex.full_attention(q, k, v, mask=mask, return_lse=True, implementation="dense")
    assert max_abs(backend.to_numpy(out), ref[0]) <= 1e-13 and max_abs(backend.to_numpy(lse), ref[1]) <= 1e-13


@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled"])
@pytest.mark.parametrize("params", [dict(), dict(relay=4, ring=False), dict(relay=2, alignment="bottom_right")])
def test_equals_full_with_mask(backend, implementation, params):
    q, k, v = qkv_host(1, length=9, key_length=11)
    check(backend, q, k, v, implementation, **params)


def test_pattern_record_and_tiny_sequences():
    q, k, v = qkv_host(2, length=6, key_length=6)
    numpy.testing.assert_array_equal(reflex.get("star").pattern(q, k, v, relay=3)[1, 2], star_mask(6, 6, 3))
    for n in (1, 2, 3):
        q, k, v = qkv_host(3, length=n, key_length=n)
        assert max_abs(reflex.star_attention(q, k, v), reflex.full_attention(q, k, v)) <= 1e-13  # n ≤ 3: all seen


@given(length=st.integers(1, 15), key_length=st.integers(1, 15), data=st.data(), ring=st.booleans(),
       alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_hypothesis(length, key_length, data, ring, alignment):
    from tests.conftest import make_backend

    relay = data.draw(st.integers(0, key_length - 1))
    q, k, v = qkv_host(4, length=length, key_length=key_length)
    check(make_backend("numpy"), q, k, v, "tiled", relay=relay, ring=ring, alignment=alignment)


def test_errors():
    q, k, v = qkv_host(5, length=4, key_length=4)
    with pytest.raises(ValueError, match="relay"):
        reflex.star_attention(q, k, v, relay=4)
    with pytest.raises(ValueError, match="ring"):
        reflex.star_attention(q, k, v, ring="yes")
