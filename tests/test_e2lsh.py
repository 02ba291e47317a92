"""e2lsh_attention: hash codes by hand, full attention restricted to equal buckets, limits, determinism."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def host_codes(x, r, b, w):
    return numpy.floor((x @ r + b) / w).astype(numpy.int64)


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_equals_full_restricted_on_every_backend(backend, causal):
    q, k, v = qkv_host(1, length=7, key_length=10)
    r, b = random.normal((5, 2), seed=2), random.uniform((2,), seed=3, high=3.0)
    out, lse = reflex.e2lsh_attention(*(backend.asarray(a) for a in (q, k, v)), num_projections=2, bucket_width=3.0,
                                      projections=backend.asarray(r), offsets=backend.asarray(b), causal=causal,
                                      return_lse=True)
    cq, ck = host_codes(q, r, b, 3.0), host_codes(numpy.repeat(k, 2, axis=-3), r, b, 3.0)
    pattern = numpy.all(cq[..., :, None, :] == ck[..., None, :, :], axis=-1)
    if causal:
        pattern &= numpy.arange(10)[None, :] <= numpy.arange(7)[:, None] + (0 if causal == "top_left" else 3)
    numpy.testing.assert_array_equal(reflex.get("e2lsh").pattern(q, k, v, num_projections=2, bucket_width=3.0,
                                                                 projections=r, offsets=b, causal=causal), pattern)
    ref, ref_lse = reflex.full_attention(q, k, v, mask=pattern, return_lse=True)
    assert max_abs(backend.to_numpy(out), ref) <= 1e-13 and max_abs(backend.to_numpy(lse), ref_lse) <= 1e-13
    assert numpy.any(~pattern.any(-1))  # some queries share a bucket with no key: zero rows are exercised


def test_codes_identical_across_backends_and_match_by_hand(backend):
    q, _, _ = qkv_host(4, length=30)
    want = reflex.e2lsh_hash(q, num_projections=3, bucket_width=0.5, seed=7)
    got = backend.to_numpy(reflex.e2lsh_hash(backend.asarray(q), num_projections=3, bucket_width=0.5, seed=7))
    numpy.testing.assert_array_equal(got, want)
    r = random.normal((5, 3), seed=(7, 0))
    b = random.uniform((3,), seed=(7, 1), high=0.5)
    assert numpy.mean(want == host_codes(q, r, b, 0.5)) == 1.0


@pytest.mark.parametrize("causal", [False, "top_left"])
def test_wide_bucket_equals_full(causal):
    q, k, v = qkv_host(5, length=6, key_length=9)
    a = reflex.e2lsh_attention(q, k, v, num_projections=2, bucket_width=1e9, seed=1, causal=causal, return_lse=True)
    b = reflex.full_attention(q, k, v, causal=causal, return_lse=True)
    assert max_abs(a[0], b[0]) <= 1e-14 and max_abs(a[1], b[1]) <= 1e-13


def test_errors():
    q, k, v = qkv_host(6)
    with pytest.raises(ValueError, match="bucket_width must be a positive number"):
        reflex.e2lsh_attention(q, k, v, num_projections=1, bucket_width=0, seed=1)
    with pytest.raises(ValueError, match="pass seed=, or projections="):
        reflex.e2lsh_attention(q, k, v, num_projections=1, bucket_width=1.0)
    with pytest.raises(ValueError, match=r"projections must have shape \(5, 2\)"):
        reflex.e2lsh_attention(q, k, v, num_projections=2, bucket_width=1.0, projections=numpy.ones((5, 3)),
                               offsets=numpy.ones(2))
