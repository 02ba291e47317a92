"""lsh_attention: per round against the dense path, the round combination by hand, limits, buckets, errors."""

from __future__ import annotations

import math

import numpy
import pytest

import reflex
from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms import lsh as lsh_module
from tests.helpers import max_abs

H, D, L = 2, 8, 16


def inputs(seed, *, length=L, n_hashes=2, half=2, batch=(2,)):
    qk = random.normal((*batch, H, length, D), seed=(seed, 0))
    v = random.normal((*batch, H, length, 5), seed=(seed, 1))
    rot = random.normal((H, D, n_hashes, half), seed=(seed, 2))
    return qk, v, rot


def restricted(qk, v, counts, scale=None):
    """The dense oracle: full attention over the shared keys, mask count > 0, bias log(count)."""
    bias = numpy.log(numpy.where(counts > 0, counts, 1).astype(float))
    return reflex.full_attention(qk, reflex.lsh_keys(qk), v, mask=counts > 0, bias=bias,
                                 scale=1 / math.sqrt(qk.shape[-1]) if scale is None else scale, return_lse=True)


CONFIGS = [
    dict(n_buckets=4, n_hashes=2, chunk_length=4),
    dict(n_buckets=4, n_hashes=2, chunk_length=4, causal=True),
    dict(n_buckets=(2, 4), n_hashes=3, chunk_length=8, num_chunks_after=1),
    dict(n_buckets=2, n_hashes=1, chunk_length=2, num_chunks_before=2, causal=True),
]


def _half(config):
    nb = config["n_buckets"]
    return sum(f // 2 for f in nb) if isinstance(nb, tuple) else nb // 2


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_equals_dense_restricted_on_every_backend(backend, config):
    qk, v, rot = inputs(1, n_hashes=config["n_hashes"], half=_half(config))
    out, lse = reflex.lsh_attention(backend.asarray(qk), backend.asarray(v), rotations=backend.asarray(rot),
                                    return_lse=True, **config)
    counts = reflex.lsh_pattern(qk, rotations=rot, **config)
    ref, ref_lse = restricted(qk, v, counts)
    assert max_abs(backend.to_numpy(out), ref) <= 1e-13
    assert reflex.get("lsh").pattern(qk, v, rotations=rot, **config).dtype == numpy.int64
    # lse agrees except where a query saw only itself in every round (HF's −1e5 self score)
    per_round = reflex.lsh_pattern(qk, rotations=rot, per_round=True, **config)
    alone = numpy.all(numpy.sum(per_round * (1 - numpy.eye(L, dtype=numpy.int64)), axis=-1) == 0, axis=-2)
    got_lse = backend.to_numpy(lse)
    assert max_abs(numpy.where(alone, 0, got_lse), numpy.where(alone, 0, ref_lse)) <= 1e-13
    copies = numpy.sum(per_round[..., numpy.arange(L), numpy.arange(L)], axis=-2)
    assert numpy.all(numpy.abs(got_lse[alone] - (-1e5 + numpy.log(copies[alone]))) <= 1e-9)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("implementation", ["array_api", "numba"])
def test_each_round_against_dense_and_the_combination_by_hand(config, implementation):
    qk, v, rot = inputs(2, n_hashes=config["n_hashes"], half=_half(config))
    p = _kernels.prepare(qk, qk, v)
    plan = lsh_module._plan(p, config["n_buckets"], config["n_hashes"], config["chunk_length"],
                            config.get("num_chunks_before", 1), config.get("num_chunks_after", 0),
                            config.get("causal", False), None)
    out_r, lse_r = lsh_module._rounds(p, plan, rot, implementation == "numba")
    per_round = reflex.lsh_pattern(qk, rotations=rot, per_round=True, **config)
    for r in range(config["n_hashes"]):
        c = per_round[..., r, :, :]
        ref, ref_lse = restricted(qk, v, c)
        assert max_abs(out_r[..., r, :, :], ref) <= 1e-13
        alone = numpy.sum(c * (1 - numpy.eye(L, dtype=numpy.int64)), axis=-1) == 0
        assert max_abs(lse_r[..., r, :][~alone], ref_lse[~alone]) <= 1e-13
        assert numpy.all(lse_r[..., r, :][alone] == -1e5 + numpy.log(c[..., numpy.arange(L), numpy.arange(L)][alone]))
    # the combination, by hand: softmax over rounds of the per-round lse
    weights = numpy.exp(lse_r - lse_r.max(axis=-2, keepdims=True))
    weights /= weights.sum(axis=-2, keepdims=True)
    by_hand = numpy.sum(out_r * weights[..., None], axis=-3)
    out, lse = reflex.lsh_attention(qk, v, rotations=rot, return_lse=True, implementation=implementation, **config)
    assert max_abs(out, by_hand) <= 1e-14
    top = lse_r.max(axis=-2)
    expected = top + numpy.log(numpy.exp(lse_r - top[..., None, :]).sum(axis=-2))
    # relative round-off: rows that saw only themselves have lse ≈ −1e5, whose ulp is 1.5e-11
    assert numpy.all(numpy.abs(lse - expected) <= 1e-13 * numpy.maximum(1.0, numpy.abs(expected)))


def _self_rule_full(qk, v, causal):
    mask = ~numpy.eye(qk.shape[-2], dtype=bool)
    if causal:
        mask &= numpy.tril(numpy.ones_like(mask))
    mask[~mask.any(axis=-1), ~mask.any(axis=-1)] = True  # nothing else allowed: itself
    return reflex.full_attention(qk, reflex.lsh_keys(qk), v, mask=mask)


@pytest.mark.parametrize("causal", [False, True])
def test_one_bucket_and_long_chunks_equal_shared_qk_full_attention(backend, causal):
    qk, v, _ = inputs(3)
    ref = _self_rule_full(qk, v, causal)
    for n_buckets in (1, 2):  # 2 buckets: hashing would matter, but chunk ≥ L skips it
        out = reflex.lsh_attention(backend.asarray(qk), backend.asarray(v), n_buckets=n_buckets, chunk_length=L,
                                   seed=0, causal=causal)
        assert max_abs(backend.to_numpy(out), ref) <= 1e-13
    # one bucket, chunks of 4, a window of all 4 chunks: the hashed path sees every key exactly once
    rot = numpy.zeros((H, D, 1, 0))
    out = reflex.lsh_attention(backend.asarray(qk), backend.asarray(v), n_buckets=1, chunk_length=4,
                               num_chunks_before=3, rotations=backend.asarray(rot), causal=causal)
    assert max_abs(backend.to_numpy(out), ref) <= 1e-13


def test_buckets_and_sort_identical_across_backends(backend):
    qk, _, rot = inputs(4, n_hashes=3, half=3)
    want = reflex.lsh_buckets(qk, n_buckets=(2, 4), n_hashes=3, rotations=rot)
    got = backend.to_numpy(reflex.lsh_buckets(backend.asarray(qk), n_buckets=(2, 4), n_hashes=3,
                                              rotations=backend.asarray(rot)))
    numpy.testing.assert_array_equal(got, want)
    assert want.shape == (2, H, 3, L) and want.min() >= 0 and want.max() < 8
    order = backend.to_numpy(reflex.lsh_sort(backend.asarray(want)))
    numpy.testing.assert_array_equal(order, numpy.argsort(want, axis=-1, kind="stable"))
    ranked = numpy.take_along_axis(want * L + numpy.arange(L), order, axis=-1)
    assert numpy.all(numpy.diff(ranked, axis=-1) > 0)  # sorted by (bucket, position)


def test_bucket_definition_and_ties():
    qk, _, rot = inputs(5, n_hashes=2, half=3)
    buckets = reflex.lsh_buckets(qk, n_buckets=6, n_hashes=2, rotations=rot)
    proj = numpy.einsum("bhld,hdrk->bhrlk", qk, rot)
    numpy.testing.assert_array_equal(buckets, numpy.argmax(numpy.concatenate([proj, -proj], -1), -1))
    zeros = reflex.lsh_buckets(numpy.zeros((1, H, 3, D)), n_buckets=6, n_hashes=2, rotations=rot)
    assert numpy.all(zeros == 0)  # all projections tie at 0: the first index
    seeded = reflex.lsh_buckets(qk, n_buckets=6, n_hashes=2, seed=11)
    numpy.testing.assert_array_equal(seeded, reflex.lsh_buckets(qk, n_buckets=6, n_hashes=2,
                                                                rotations=random.normal((H, D, 2, 3), seed=11)))


def test_seed_equals_explicit_rotations_and_no_batch_axes():
    qk, v, _ = inputs(6, batch=())
    a = reflex.lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_length=4, seed=3)
    b = reflex.lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_length=4, rotations=random.normal((H, D, 2, 2), seed=3))
    assert a.shape == (H, L, 5) and max_abs(a, b) == 0.0


def test_edges_and_dtypes():
    qk, v, _ = inputs(7, length=1)
    out, lse = reflex.lsh_attention(qk, v, n_buckets=2, chunk_length=4, seed=0, return_lse=True)
    assert max_abs(out, v) == 0.0 and numpy.all(lse == -1e5)  # L = 1: only itself
    qk, v, _ = inputs(7, length=0)
    assert reflex.lsh_attention(qk, v, n_buckets=2, chunk_length=4, seed=0).shape == (2, H, 0, 5)
    qk, v, rot = inputs(7)
    out = reflex.lsh_attention(qk.astype(numpy.float32), v.astype(numpy.float32), n_buckets=4, n_hashes=2, chunk_length=4, rotations=rot)
    assert out.dtype == numpy.float64
    out32 = reflex.lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_length=4, rotations=rot, compute_dtype="float32")
    assert out32.dtype == numpy.float32


def test_errors():
    qk, v, rot = inputs(8)
    with pytest.raises(ValueError, match="n_buckets must be 1, an even int"):
        reflex.lsh_attention(qk, v, n_buckets=3, chunk_length=4, seed=0)
    with pytest.raises(ValueError, match="exactly one of rotations"):
        reflex.lsh_attention(qk, v, n_buckets=4, chunk_length=4, seed=0, rotations=rot[:, :, :1])
    with pytest.raises(ValueError, match=r"rotations must have shape \(H, D, n_hashes, n_buckets/2\) = \(2, 8, 2, 2\)"):
        reflex.lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_length=4, rotations=rot[..., :1])
    with pytest.raises(ValueError, match="must be a multiple of chunk_length"):
        reflex.lsh_attention(qk, v, n_buckets=4, chunk_length=5, seed=0)
    with pytest.raises(ValueError, match=r"v has \(heads, length\) \(1, 16\)"):
        reflex.lsh_attention(qk, v[:, :1], n_buckets=4, chunk_length=4, seed=0)
    with pytest.raises(ValueError, match="implementation must be one of"):
        reflex.lsh_attention(qk, v, n_buckets=4, chunk_length=4, seed=0, implementation="dense")
