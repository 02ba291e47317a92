"""sparse_pattern_attention: mask, CSR and block-mask forms equal full_attention with the expanded mask."""

from __future__ import annotations

import numpy
import pytest
import scipy.sparse
from hypothesis import given
from hypothesis import strategies as st

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def reference(q, k, v, mask):
    return reflex.full_attention(q, k, v, mask=mask, return_lse=True, implementation="dense")


def run(backend, q, k, v, **kwargs):
    moved = {n: backend.asarray(a) if isinstance(a, numpy.ndarray) else a for n, a in kwargs.items()}
    out, lse = reflex.sparse_pattern_attention(*[backend.asarray(a) for a in (q, k, v)], return_lse=True, **moved)
    return backend.to_numpy(out), backend.to_numpy(lse)


def csr_of(seed, length, key_length, density):
    """A scipy CSR pattern (independent construction) with its dense boolean form."""
    matrix = scipy.sparse.random(length, key_length, density=density, format="csr", random_state=seed)
    matrix.sort_indices()
    return matrix.indptr.astype(numpy.int64), matrix.indices.astype(numpy.int64), matrix.toarray() != 0


def expand_blocks(blocks, bq, bk, length, key_length):
    """Block mask → element mask with numpy.kron, cropped (independent of the term function)."""
    ones = numpy.ones((bq, bk), dtype=int)
    full = numpy.stack([numpy.kron(b.astype(int), ones) for b in blocks.reshape(-1, *blocks.shape[-2:])])
    return full.reshape(*blocks.shape[:-2], *full.shape[-2:])[..., :length, :key_length] > 0


@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled"])
def test_mask_form(backend, implementation):
    q, k, v = qkv_host(1, length=7, key_length=10)
    mask = random.uniform((2, 1, 7, 10), seed=2) < 0.4
    mask[0, 0, 3] = False
    out, lse = run(backend, q, k, v, mask=mask, implementation=implementation)
    ref = reference(q, k, v, mask)
    assert max_abs(out, ref[0]) <= 1e-13 and max_abs(lse, ref[1]) <= 1e-13
    assert numpy.all(out[0, :, 3] == 0) and numpy.all(lse[0, :, 3] == -numpy.inf)


@pytest.mark.parametrize("implementation", ["auto", "gather", "dense", "tiled"])
def test_csr_form(backend, implementation):
    q, k, v = qkv_host(3, length=8, key_length=11)
    indptr, indices, dense = csr_of(4, 8, 11, 0.35)
    out, lse = run(backend, q, k, v, indptr=indptr, indices=indices, implementation=implementation)
    ref = reference(q, k, v, dense)
    assert max_abs(out, ref[0]) <= 1e-13 and max_abs(lse, ref[1]) <= 1e-13


@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled"])
def test_block_form_partial_blocks(backend, implementation):
    q, k, v = qkv_host(5, length=10, key_length=7)  # 3 ∤ 10, 2 ∤ 7: partial last blocks
    blocks = random.uniform((4, 4, 4), seed=6) < 0.5
    out, lse = run(backend, q, k, v, block_mask=blocks, block_size=(3, 2), implementation=implementation)
    ref = reference(q, k, v, expand_blocks(blocks, 3, 2, 10, 7))
    assert max_abs(out, ref[0]) <= 1e-13 and max_abs(lse, ref[1]) <= 1e-13


def test_pattern_record_matches_each_form():
    q, k, v = qkv_host(7, length=6, key_length=9)
    m = reflex.get("sparse_pattern")
    indptr, indices, dense = csr_of(8, 6, 9, 0.5)
    numpy.testing.assert_array_equal(m.pattern(q, k, v, indptr=indptr, indices=indices)[1, 2], dense)
    blocks = random.uniform((3, 5), seed=9) < 0.5
    numpy.testing.assert_array_equal(m.pattern(q, k, v, block_mask=blocks, block_size=2)[0, 0],
                                     expand_blocks(blocks, 2, 2, 6, 9))


def test_edges_one_query_one_key_and_empty_csr():
    for length, key_length in ((1, 1), (1, 5), (5, 1)):
        q, k, v = qkv_host(10, length=length, key_length=key_length)
        mask = numpy.ones((length, key_length), dtype=bool)
        out = reflex.sparse_pattern_attention(q, k, v, mask=mask)
        assert max_abs(out, reflex.full_attention(q, k, v)) <= 1e-13
    q, k, v = qkv_host(11, length=3, key_length=4)
    out, lse = reflex.sparse_pattern_attention(q, k, v, indptr=numpy.zeros(4, dtype=numpy.int64),
                                               indices=numpy.zeros(0, dtype=numpy.int64), return_lse=True)
    assert numpy.all(out == 0) and numpy.all(lse == -numpy.inf)


@given(length=st.integers(1, 12), key_length=st.integers(1, 12), density=st.floats(0.0, 1.0),
       bq=st.integers(1, 5), bk=st.integers(1, 5), seed=st.integers(0, 1000))
def test_hypothesis_forms_agree(length, key_length, density, bq, bk, seed):
    q, k, v = qkv_host(seed, length=length, key_length=key_length)
    indptr, indices, dense = csr_of(seed, length, key_length, density)
    ref = reference(q, k, v, dense)
    for implementation in ("gather", "tiled"):
        out = reflex.sparse_pattern_attention(q, k, v, indptr=indptr, indices=indices, implementation=implementation,
                                              return_lse=True)
        assert max_abs(out[0], ref[0]) <= 1e-13 and max_abs(out[1], ref[1]) <= 1e-13
    blocks = random.uniform((-(-length // bq), -(-key_length // bk)), seed=seed) < density
    out = reflex.sparse_pattern_attention(q, k, v, block_mask=blocks, block_size=(bq, bk), implementation="tiled")
    assert max_abs(out, reference(q, k, v, expand_blocks(blocks, bq, bk, length, key_length))[0]) <= 1e-13


def test_errors():
    q, k, v = qkv_host(12, length=4, key_length=5)
    mask = numpy.ones((4, 5), dtype=bool)
    with pytest.raises(ValueError, match="exactly one"):
        reflex.sparse_pattern_attention(q, k, v)
    with pytest.raises(ValueError, match="exactly one"):
        reflex.sparse_pattern_attention(q, k, v, mask=mask, block_mask=mask, block_size=1)
    with pytest.raises(ValueError, match="both indptr and indices"):
        reflex.sparse_pattern_attention(q, k, v, indptr=numpy.array([0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="L \\+ 1"):
        reflex.sparse_pattern_attention(q, k, v, indptr=numpy.array([0, 1]), indices=numpy.array([0]))
    with pytest.raises(ValueError, match="distinct"):
        reflex.sparse_pattern_attention(q, k, v, indptr=numpy.array([0, 2, 2, 2, 2]), indices=numpy.array([1, 1]))
    with pytest.raises(ValueError, match="lie in"):
        reflex.sparse_pattern_attention(q, k, v, indptr=numpy.array([0, 1, 1, 1, 1]), indices=numpy.array([5]))
    with pytest.raises(ValueError, match="non-decreasing"):
        reflex.sparse_pattern_attention(q, k, v, indptr=numpy.array([0, 2, 1, 1, 2]), indices=numpy.array([0, 1]))
    with pytest.raises(ValueError, match="block_size"):
        reflex.sparse_pattern_attention(q, k, v, block_mask=mask)
    with pytest.raises(ValueError, match="must end in"):
        reflex.sparse_pattern_attention(q, k, v, block_mask=mask, block_size=2)
    with pytest.raises(ValueError, match="gather"):
        reflex.sparse_pattern_attention(q, k, v, mask=mask, implementation="gather")
    with pytest.raises(TypeError, match="boolean"):
        reflex.sparse_pattern_attention(q, k, v, mask=mask.astype(float))
