"""hierarchical: one level == block_local == full with a block-diagonal mask; levels by hand; combine."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def pooled(x, span):
    n = -(-x.shape[-2] // span)
    return numpy.stack([x[..., u * span:(u + 1) * span, :].mean(axis=-2) for u in range(n)], axis=-2)


@pytest.mark.parametrize("block_size", [1, 2, 3, 20])
def test_one_level_is_block_local(backend, block_size):
    q, k, v = qkv_host(1, length=7, key_length=10)
    i, j = numpy.arange(7)[:, None], numpy.arange(10)[None, :]
    ref = reflex.full_attention(q, k, v, mask=(i // block_size) == (j // block_size))
    for implementation in ("dense", "tiled"):
        out = reflex.hierarchical_attention(*(backend.asarray(a) for a in (q, k, v)), block_size=block_size, levels=1,
                                            implementation=implementation)
        assert max_abs(backend.to_numpy(out), ref) < 1e-14
    q, k, v = qkv_host(2, length=9, key_length=9)
    local = reflex.block_local_attention(q, k, v, block_size=block_size)
    assert max_abs(reflex.hierarchical_attention(q, k, v, block_size=block_size, levels=1), local) < 1e-14


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_levels_by_hand(backend, combine):
    q, k, v = qkv_host(3, length=6, key_length=11)
    w_o = random.normal((9, 4), seed=4)
    i, j = numpy.arange(6)[:, None], numpy.arange(11)[None, :]
    levels = [reflex.full_attention(q, k, v, mask=(i // 2) == (j // 2))]
    for span in (2, 4):  # partial last spans: 11 = 5·2 + 1 = 2·4 + 3
        levels.append(reflex.full_attention(q, pooled(k, span), pooled(v, span)))
    ref = sum(levels) if combine == "sum" else numpy.concatenate(levels, axis=-1) @ w_o
    extra = {"w_o": backend.asarray(w_o)} if combine == "concat" else {}
    out = reflex.hierarchical_attention(*(backend.asarray(a) for a in (q, k, v)), block_size=2, levels=3,
                                        combine=combine, **extra)
    assert max_abs(backend.to_numpy(out), ref) < 1e-14


def test_block_covering_everything_and_single_key():
    q, k, v = qkv_host(5, length=4, key_length=4)
    # b ≥ S: one block (full attention) and one summary (the mean value) at level 1
    out = reflex.hierarchical_attention(q, k, v, block_size=8, levels=2)
    ref = reflex.full_attention(q, k, v) + numpy.repeat(v.mean(axis=-2, keepdims=True), 2, axis=-3)
    assert max_abs(out, ref) < 1e-14
    q, k, v = qkv_host(6, length=1, key_length=1)
    out = reflex.hierarchical_attention(q, k, v, block_size=2, levels=3)
    assert max_abs(out, 3 * numpy.repeat(v, 2, axis=-3)) < 1e-15


def test_errors():
    q, k, v = qkv_host(7)
    with pytest.raises(ValueError, match="needs w_o"):
        reflex.hierarchical_attention(q, k, v, block_size=2, combine="concat")
    with pytest.raises(ValueError, match="w_o must have shape"):
        reflex.hierarchical_attention(q, k, v, block_size=2, combine="concat", w_o=numpy.zeros((3, 3)))
    with pytest.raises(ValueError, match="combine must be one of"):
        reflex.hierarchical_attention(q, k, v, block_size=2, combine="max")
    with pytest.raises(ValueError, match="levels must be an int >= 1"):
        reflex.hierarchical_attention(q, k, v, block_size=2, levels=0)
