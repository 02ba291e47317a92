"""attention_mask (padding) on lsh, bigbird, longformer, nystrom: every backend, independent dense paths,
invariance to what padded positions hold, bad masks."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def padding(lengths, total):
    mask = numpy.zeros((len(lengths), total), dtype=bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    return mask


def scrambled(x, mask, seed):
    """x with the padded positions (mask False) replaced by other numbers."""
    noise = random.normal(x.shape, seed=seed) * 5
    return numpy.where(mask[:, None, :, None], x, noise)


def test_nystrom_mask_only_on_the_third_kernel(backend):
    q, k, v = qkv_host(1, length=12, key_length=12)
    mask = padding((12, 7), 12)
    run = lambda *a, **kw: reflex.nystrom_attention(*(backend.asarray(x) for x in a), num_landmarks=4,
                                                    attention_mask=backend.asarray(mask), **kw)
    got = backend.to_numpy(run(q, k, v))
    ref = reflex.get("nystrom").reference(q, k, v, num_landmarks=4, attention_mask=mask)  # materialised F·A⁺·B·V
    assert max_abs(got, ref) < 1e-13
    assert max_abs(backend.to_numpy(run(q, k, scrambled(v, mask, 2))), got) < 1e-13  # padded values unused
    assert max_abs(backend.to_numpy(run(q, scrambled(k, mask, 3), v)), got) > 1e-6  # padded keys still in landmarks


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_bigbird_padding_is_a_masked_dense_call(backend, small_tiles, implementation):
    q, k, v = qkv_host(4, length=16, key_length=16)
    mask = padding((16, 9), 16)
    plan = random.integers((4, 6, 1), seed=5, low=0, high=8)
    got, lse = reflex.bigbird_attention(*(backend.asarray(x) for x in (q, k, v)), block_size=2,
                                        plan=backend.asarray(plan), attention_mask=backend.asarray(mask),
                                        implementation=implementation, return_lse=True)
    counts = reflex.get("bigbird").pattern(q, k, v, block_size=2, plan=plan)
    allowed = (counts > 0) & mask[:, None, None, :] & mask[:, None, :, None]
    with numpy.errstate(divide="ignore"):
        ref, ref_lse = reflex.full_attention(q, k, v, mask=allowed, bias=numpy.log(numpy.maximum(counts, 1)),
                                             return_lse=True)
    assert max_abs(backend.to_numpy(got), ref) < 1e-13 and max_abs(backend.to_numpy(lse), ref_lse) < 1e-13
    again = reflex.bigbird_attention(q, scrambled(k, mask, 6), scrambled(v, mask, 7), block_size=2, plan=plan,
                                     attention_mask=mask)
    assert max_abs(again, ref) < 1e-13


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_longformer_padding_and_per_item_globals(backend, small_tiles, implementation):
    q, k, v = qkv_host(8, length=14, key_length=14)
    mask = padding((14, 10), 14)
    glob = numpy.zeros((2, 14), dtype=bool)
    glob[0, [0, 13]] = glob[1, [2]] = True
    got, lse = reflex.longformer_attention(*(backend.asarray(x) for x in (q, k, v)), window=(2, 2),
                                           attention_mask=backend.asarray(mask), global_mask=backend.asarray(glob),
                                           implementation=implementation, return_lse=True)
    i, j = numpy.arange(14)[:, None], numpy.arange(14)[None, :]
    band = numpy.abs(i - j) <= 2
    local = (band & (mask & ~glob)[:, None, :]) | glob[:, None, :]  # (B, L, S)
    rows = numpy.where(glob[:, :, None], mask[:, None, :], local) & mask[:, :, None]
    ref, ref_lse = reflex.full_attention(q, k, v, mask=rows[:, None], return_lse=True)
    assert max_abs(backend.to_numpy(got), ref) < 1e-13 and max_abs(backend.to_numpy(lse), ref_lse) < 1e-13
    assert numpy.all(backend.to_numpy(got)[1, :, 10:] == 0)
    shared = reflex.longformer_attention(q, k, v, window=(2, 2), global_indices=[0], attention_mask=mask)
    per_item = numpy.zeros((2, 14), dtype=bool)
    per_item[:, 0] = True
    assert numpy.array_equal(shared, reflex.longformer_attention(q, k, v, window=(2, 2), attention_mask=mask,
                                                                 global_mask=per_item))
    all_real = reflex.longformer_attention(q, k, v, window=(2, 2), global_indices=[0], attention_mask=numpy.ones((2, 14), bool))
    assert max_abs(all_real, reflex.longformer_attention(q, k, v, window=(2, 2), global_indices=[0])) < 1e-14


@pytest.mark.parametrize("chunk", [4, 32])
def test_lsh_padding_against_the_pattern_reference(backend, chunk):
    qk = random.normal((2, 2, 32, 8), seed=9)
    v = random.normal((2, 2, 32, 6), seed=10)
    rotations = random.normal((2, 8, 2, 2), seed=11)
    mask = padding((32, 19), 32)
    params = dict(n_buckets=4, n_hashes=2, chunk_length=chunk, causal=False, attention_mask=mask)
    got = reflex.lsh_attention(backend.asarray(qk), backend.asarray(v), rotations=backend.asarray(rotations),
                               **{**params, "attention_mask": backend.asarray(mask)})
    ref = reflex.get("lsh").reference(qk, v, rotations=rotations, **params)
    assert max_abs(backend.to_numpy(got), ref) < 1e-13
    counts = reflex.lsh_pattern(qk, rotations=rotations, **params)
    off_diagonal = counts * (1 - numpy.eye(32, dtype=numpy.int64))
    assert not numpy.any(off_diagonal[1][..., 19:])  # no padded key is attended


def test_bad_masks():
    q, k, v = qkv_host(12, length=8, key_length=8)
    ints = numpy.ones((2, 8), dtype=numpy.int64)
    with pytest.raises(TypeError, match="attention_mask must be a boolean"):
        reflex.bigbird_attention(q, k, v, block_size=2, plan=numpy.zeros((4, 2, 1), dtype=int), attention_mask=ints)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(..., S\)"):
        reflex.nystrom_attention(q, k, v, num_landmarks=2, attention_mask=numpy.ones((2, 7), bool))
    with pytest.raises(ValueError, match="global token is padding"):
        glob = numpy.zeros((2, 8), bool)
        glob[1, 7] = True
        reflex.longformer_attention(q, k, v, window=(1, 1), attention_mask=padding((8, 5), 8), global_mask=glob)
    with pytest.raises(ValueError, match="not both"):
        reflex.longformer_attention(q, k, v, window=(1, 1), global_indices=[0], global_mask=numpy.ones((2, 8), bool))
    with pytest.raises(ValueError, match="array-API path"):
        reflex.lsh_attention(random.normal((2, 2, 8, 4), seed=1), random.normal((2, 2, 8, 4), seed=2), n_buckets=2,
                             chunk_length=4, seed=0, attention_mask=numpy.ones((2, 8), bool), implementation="numba")


@pytest.mark.parametrize("separate", [False, True])
def test_padded_vjps_match_finite_differences(separate):
    from tests.helpers import assert_vjp_matches_finite_differences

    q, k, v = qkv_host(13, length=8, key_length=8, batch=(2,))
    mask = padding((8, 5), 8)
    glob = numpy.zeros((2, 8), dtype=bool)
    glob[0, [0, 7]] = glob[1, 2] = True
    given = {"q": q, "k": k, "v": v, "attention_mask": mask, "global_mask": glob}
    if separate:
        extra = qkv_host(14, length=8, key_length=8)
        given.update(q_global=extra[0], k_global=extra[1], v_global=extra[2])
    d_out, d_lse = random.normal((2, 4, 8, 3), seed=15), random.normal((2, 4, 8), seed=16)
    assert_vjp_matches_finite_differences("longformer", given, d_out, d_lse=d_lse, params={"window": (1, 1)},
                                          max_entries=30)
    plan = random.integers((4, 2, 1), seed=17, low=0, high=4)
    assert_vjp_matches_finite_differences("bigbird", {"q": q, "k": k, "v": v, "plan": plan, "attention_mask": mask},
                                          d_out, d_lse=d_lse, params={"block_size": 2}, max_entries=30)
    assert_vjp_matches_finite_differences("nystrom", {"q": q, "k": k, "v": v, "attention_mask": mask}, d_out,
                                          params={"num_landmarks": 4}, max_entries=30)
