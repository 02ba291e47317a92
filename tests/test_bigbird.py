"""bigbird_attention: equals full_attention with the HF block lists (mask + log multiplicity bias)."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def hf_block_lists(plan, blocks):
    """Key blocks per (head, query block), written from the description of HF in docs/conventions.md."""
    heads = plan.shape[0]
    lists = {}
    for h in range(heads):
        lists[h, 0] = list(range(blocks))
        lists[h, blocks - 1] = list(range(blocks))
        for a in range(1, blocks - 1):
            if a == 1:
                window = [0, 1, 2, blocks - 1]
            elif a == blocks - 2:
                window = [0, blocks - 3, blocks - 2, blocks - 1]
            else:
                window = [0, a - 1, a, a + 1, blocks - 1]
            lists[h, a] = window + [int(b) for b in plan[h, a - 1]]
    return lists


def multiplicity(plan, blocks, block_size):
    heads = plan.shape[0]
    m = numpy.zeros((heads, blocks * block_size, blocks * block_size))
    for (h, a), listed in hf_block_lists(plan, blocks).items():
        for b in listed:
            m[h, a * block_size:(a + 1) * block_size, b * block_size:(b + 1) * block_size] += 1
    return m


def reference(q, k, v, plan, block_size):
    blocks = q.shape[-2] // block_size
    m = multiplicity(plan, blocks, block_size)
    with numpy.errstate(divide="ignore"):
        return reflex.full_attention(q, k, v, mask=m > 0, bias=numpy.where(m > 0, numpy.log(numpy.maximum(m, 1)), 0.0),
                                     return_lse=True, implementation="dense")


@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled"])
@pytest.mark.parametrize("blocks,r", [(6, 1), (8, 2), (5, 0)])
def test_equals_full_with_block_lists(backend, implementation, blocks, r):
    block_size = 2
    q, k, v = qkv_host(1, length=blocks * block_size, key_length=blocks * block_size)
    plan = random.integers((4, blocks - 2, r), seed=2, low=0, high=blocks)  # duplicates allowed, as HF
    out, lse = reflex.bigbird_attention(*map(backend.asarray, (q, k, v)), block_size=block_size,
                                        plan=backend.asarray(plan), implementation=implementation, return_lse=True)
    ref = reference(q, k, v, plan, block_size)
    assert max_abs(backend.to_numpy(out), ref[0]) <= 1e-13 and max_abs(backend.to_numpy(lse), ref[1]) <= 1e-13


def test_seeded_plan_avoids_window_and_globals_and_pattern_record():
    q, k, v = qkv_host(3, length=20, key_length=20)
    m = reflex.get("bigbird")
    pattern = m.pattern(q, k, v, block_size=2, num_random_blocks=2, seed=5)
    assert pattern.dtype.kind == "i" and pattern.max() == 1  # seeded plans never repeat a block
    assert (pattern[0, 0] > 0).sum(axis=-1)[4] == 7 * 2  # a middle block: 5 structural + 2 random blocks
    out = reflex.bigbird_attention(q, k, v, block_size=2, num_random_blocks=2, seed=5)
    assert max_abs(out, reflex.full_attention(q, k, v, mask=pattern > 0)) <= 1e-13


def test_zero_plan_counts_block_zero_twice():
    q, k, v = qkv_host(4, length=12, key_length=12)
    plan = numpy.zeros((4, 4, 1), dtype=numpy.int64)
    pattern = reflex.get("bigbird").pattern(q, k, v, block_size=2, plan=plan)
    assert pattern[0, 0, 4, 0] == 2 and pattern[0, 0, 0, 5] == 1


def test_small_block_counts():
    for blocks in (1, 2, 3, 4):
        q, k, v = qkv_host(5, length=blocks * 3, key_length=blocks * 3)
        plan = numpy.zeros((4, max(blocks - 2, 0), 0), dtype=numpy.int64)
        out = reflex.bigbird_attention(q, k, v, block_size=3, plan=plan)
        assert max_abs(out, reflex.full_attention(q, k, v)) <= 1e-13  # ≤ 4 blocks: every block is seen


@given(blocks=st.integers(4, 9), block_size=st.integers(1, 3), r=st.integers(0, 3), seed=st.integers(0, 50))
def test_hypothesis(blocks, block_size, r, seed):
    q, k, v = qkv_host(seed, length=blocks * block_size, key_length=blocks * block_size)
    plan = random.integers((4, blocks - 2, r), seed=seed, low=0, high=blocks)
    ref = reference(q, k, v, plan, block_size)
    out = reflex.bigbird_attention(q, k, v, block_size=block_size, plan=plan, implementation="tiled", return_lse=True)
    assert max_abs(out[0], ref[0]) <= 1e-13 and max_abs(out[1], ref[1]) <= 1e-13


def test_errors():
    q, k, v = qkv_host(6, length=12, key_length=12)
    with pytest.raises(ValueError, match="multiple of block_size"):
        reflex.bigbird_attention(q, k, v, block_size=5, seed=0, num_random_blocks=1)
    with pytest.raises(ValueError, match="exactly one"):
        reflex.bigbird_attention(q, k, v, block_size=2)
    with pytest.raises(ValueError, match="shape"):
        reflex.bigbird_attention(q, k, v, block_size=2, plan=numpy.zeros((4, 3, 1), dtype=int))
    with pytest.raises(ValueError, match="block indices"):
        reflex.bigbird_attention(q, k, v, block_size=2, plan=numpy.full((4, 4, 1), 6))
    with pytest.raises(ValueError, match="exceeds"):
        reflex.bigbird_attention(q, k, v, block_size=2, num_random_blocks=2, seed=0)
    q2, k2, v2 = qkv_host(6, length=6, key_length=8)
    with pytest.raises(ValueError, match="self-attention"):
        reflex.bigbird_attention(q2, k2, v2, block_size=2, seed=0, num_random_blocks=0)
