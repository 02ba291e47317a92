"""task_prior_attention: equals full with the block-diagonal prior (scipy.linalg.block_diag) as bias."""

from __future__ import annotations

import numpy
import pytest
from scipy.linalg import block_diag

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def prior_host(blocks):
    """Block-diagonal matrices built one (batch, head) at a time with SciPy."""
    lead = blocks.shape[:-3]
    out = numpy.empty((*lead, blocks.shape[-3] * blocks.shape[-2], blocks.shape[-3] * blocks.shape[-1]))
    for idx in numpy.ndindex(*lead):
        out[idx] = block_diag(*blocks[idx])
    return out


@pytest.mark.parametrize("causal", [False, "top_left"])
def test_equals_full_with_block_diagonal_bias(backend, causal):
    q, k, v = qkv_host(0, length=6, key_length=9)
    blocks = random.normal((2, 4, 3, 2, 3), seed=3)
    out, lse = reflex.task_prior_attention(*(backend.asarray(a) for a in (q, k, v)), blocks=backend.asarray(blocks),
                                           causal=causal, return_lse=True)
    ref_out, ref_lse = reflex.full_attention(q, k, v, bias=prior_host(blocks), causal=causal, return_lse=True)
    assert max_abs(backend.to_numpy(out), ref_out) <= 1e-13 and max_abs(backend.to_numpy(lse), ref_lse) <= 1e-13


def test_film_modulation_and_shared_blocks(backend):
    q, k, v = qkv_host(1, length=4, key_length=4)
    blocks = random.normal((2, 2, 2), seed=4)
    gamma, beta = random.normal((2, 1, 1, 1, 1), seed=5), random.normal((1, 4, 1, 1, 1), seed=6)
    got = reflex.task_prior_attention(*(backend.asarray(a) for a in (q, k, v)), blocks=backend.asarray(blocks),
                                      gamma=backend.asarray(gamma), beta=backend.asarray(beta))
    ref = reflex.full_attention(q, k, v, bias=prior_host(blocks * gamma + beta))
    assert max_abs(backend.to_numpy(got), ref) <= 1e-13


def test_one_block_is_a_dense_bias_and_zero_blocks_are_full():
    q, k, v = qkv_host(2, length=3, key_length=5)
    bias = random.normal((2, 4, 1, 3, 5), seed=7)
    assert max_abs(reflex.task_prior_attention(q, k, v, blocks=bias), reflex.full_attention(q, k, v, bias=bias[:, :, 0])) <= 1e-13
    zeros = numpy.zeros((1, 3, 5))
    assert max_abs(reflex.task_prior_attention(q, k, v, blocks=zeros), reflex.full_attention(q, k, v)) == 0.0


def test_errors():
    q, k, v = qkv_host(3, length=6, key_length=9)
    with pytest.raises(ValueError, match="expected \\(L, S\\) = \\(6, 9\\)"):
        reflex.task_prior_attention(q, k, v, blocks=numpy.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="blocks must have shape"):
        reflex.task_prior_attention(q, k, v, blocks=numpy.zeros((6, 9)))
