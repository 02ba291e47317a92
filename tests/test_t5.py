"""t5_bias: bucket formula (float32 convention), bias table lookup, engine paths, edges, errors."""

from __future__ import annotations

import math

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def bucket_by_hand(r, bidirectional, num_buckets, max_distance):
    """One relative position at a time, each float32 step rounded with numpy.float32."""
    f32 = numpy.float32
    offset = 0
    if bidirectional:
        num_buckets //= 2
        offset = num_buckets if r > 0 else 0
        n = abs(r)
    else:
        n = max(-r, 0)
    exact = num_buckets // 2
    if n < exact:
        return offset + n
    ratio = f32(f32(n) / f32(exact))
    log_ratio = f32(math.log(float(ratio)))
    scaled = f32(f32(log_ratio / f32(math.log(max_distance / exact))) * f32(num_buckets - exact))
    return offset + min(exact + int(scaled), num_buckets - 1)


CONFIGS = [(True, 32, 128), (False, 32, 128), (True, 64, 256), (False, 9, 128), (False, 17, 27), (True, 34, 27),
           (False, 48, 81), (True, 6, 3)]


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", CONFIGS)
def test_buckets_match_the_float32_formula(backend, bidirectional, num_buckets, max_distance):
    rel = numpy.concatenate([numpy.arange(-1500, 1501), [-100000, -65537, -4097, 4097, 65537, 100000]])
    got = backend.to_numpy(reflex.t5_relative_position_bucket(backend.asarray(rel), bidirectional=bidirectional,
                                                              num_buckets=num_buckets, max_distance=max_distance))
    want = [bucket_by_hand(int(r), bidirectional, num_buckets, max_distance) for r in rel]
    assert got.dtype == numpy.int64 and got.tolist() == want


def test_known_buckets():
    rel = numpy.array([-200, -128, -127, -9, -8, -7, -1, 0, 1, 7, 8, 9, 127, 128, 200])
    # golden values from transformers 5.23 T5Attention._relative_position_bucket
    enc = reflex.t5_relative_position_bucket(rel).tolist()
    assert enc == [15, 15, 15, 8, 8, 7, 1, 0, 17, 23, 24, 24, 31, 31, 31]
    dec = reflex.t5_relative_position_bucket(rel, bidirectional=False).tolist()
    assert dec == [31, 31, 31, 9, 8, 7, 1] + [0] * 8


def test_float64_log_would_pick_other_buckets():
    # unidirectional, 9 buckets, max_distance 128: log(n/4)/log(32)*5 sits on an integer at n = 8, 16, 64
    rel = -numpy.array([8, 16, 64])
    got = reflex.t5_relative_position_bucket(rel, bidirectional=False, num_buckets=9, max_distance=128)
    naive = [4 + int(math.log(n / 4) / math.log(128 / 4) * 5) for n in (8, 16, 64)]
    assert got.tolist() == [bucket_by_hand(int(r), False, 9, 128) for r in rel]
    assert got.tolist() != naive


@pytest.mark.parametrize("causal", [False, "bottom_right"])
@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_equals_full_with_the_bias(backend, causal, implementation):
    q, k, v = qkv_host(1, length=6, key_length=40)
    table = random.normal((16, 4), seed=2)
    options = dict(bidirectional=not causal, max_distance=20, query_offset=34 if causal else 3)
    bias = reflex.t5_bias(table, 6, 40, **options)
    i, j = numpy.arange(6)[:, None], numpy.arange(40)[None, :]
    buckets = reflex.t5_relative_position_bucket(j - i - options["query_offset"], bidirectional=not causal,
                                                 num_buckets=16, max_distance=20)
    assert numpy.array_equal(bias, numpy.moveaxis(table[buckets], -1, 0))
    ref, ref_lse = reflex.full_attention(q, k, v, bias=bias, causal=causal, return_lse=True)
    out, lse = reflex.t5_bias_attention(*(backend.asarray(a) for a in (q, k, v)), table=backend.asarray(table),
                                        causal=causal, implementation=implementation, return_lse=True, **options)
    assert max_abs(backend.to_numpy(out), ref) < 1e-14
    assert max_abs(backend.to_numpy(lse), ref_lse) < 1e-13


def test_tiled_over_many_tiles_equals_dense():
    from reflex.mechanisms import _kernels
    from reflex.mechanisms.t5 import _table_term

    q, k, v = qkv_host(3, length=70, key_length=90)
    table = random.normal((32, 4), seed=4)
    p = _kernels.prepare(q, k, v)
    term = _table_term(table, 5, True, 32, 50)
    dense = _kernels.dense(p, scale=0.4, bias=term)
    tiled = _kernels.tiled(p, scale=0.4, bias=term, block_q=16, block_k=7)
    assert max_abs(dense[0], tiled[0]) < 1e-14 and max_abs(dense[1], tiled[1]) < 1e-13


def test_edges(backend):
    q, k, v = qkv_host(5, length=1, key_length=1)
    table = random.normal((8, 4), seed=6)
    out = reflex.t5_bias_attention(*(backend.asarray(a) for a in (q, k, v)), table=backend.asarray(table), max_distance=5)
    assert max_abs(backend.to_numpy(out), numpy.repeat(v, 2, axis=-3)) < 1e-15


def test_errors():
    q, k, v = qkv_host(7)
    with pytest.raises(ValueError, match="table has 3 heads"):
        reflex.t5_bias_attention(q, k, v, table=numpy.zeros((32, 3)))
    with pytest.raises(ValueError, match="max_distance must exceed"):
        reflex.t5_relative_position_bucket(numpy.arange(3), num_buckets=32, max_distance=8)
    with pytest.raises(ValueError, match="num_buckets must be >= 4"):
        reflex.t5_relative_position_bucket(numpy.arange(3), num_buckets=3)
    with pytest.raises(TypeError, match="integer array"):
        reflex.t5_relative_position_bucket(numpy.arange(3.0))
