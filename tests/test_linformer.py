"""linformer_attention: explicit projections vs a NumPy formula on every backend, identity limit, errors."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def naive(q, k, v, e, f):
    r = q.shape[-3] // k.shape[-3]
    kc, vc = numpy.repeat(e @ k, r, axis=-3), numpy.repeat(f @ v, r, axis=-3)
    s = q @ numpy.swapaxes(kc, -1, -2) / numpy.sqrt(q.shape[-1])
    w = numpy.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ vc


@pytest.mark.parametrize("per_head", [False, True])
def test_matches_formula_on_every_backend(backend, per_head):
    q, k, v = qkv_host(1, length=7, key_length=11)
    e = random.normal((4, 11), seed=2)
    f = random.normal((2, 4, 11), seed=3) if per_head else random.normal((4, 11), seed=3)
    out = reflex.linformer_attention(*(backend.asarray(a) for a in (q, k, v)), e_proj=backend.asarray(e),
                                     f_proj=backend.asarray(f))
    assert max_abs(backend.to_numpy(out), naive(q, k, v, e, f)) < 1e-14


def test_identity_projections_are_full_attention():
    q, k, v = qkv_host(4, length=6, key_length=9)
    eye = numpy.eye(9)
    out, lse = reflex.linformer_attention(q, k, v, e_proj=eye, f_proj=eye, return_lse=True)
    ref, ref_lse = reflex.full_attention(q, k, v, return_lse=True)
    assert max_abs(out, ref) <= 1e-15 and max_abs(lse, ref_lse) <= 1e-15


def test_shared_projection_and_tiled_kernel():
    q, k, v = qkv_host(5, length=5, key_length=8)
    e = random.normal((3, 8), seed=6)
    shared = reflex.linformer_attention(q, k, v, e_proj=e)
    assert max_abs(shared, naive(q, k, v, e, e)) < 1e-14
    assert max_abs(shared, reflex.linformer_attention(q, k, v, e_proj=e, implementation="tiled")) < 1e-14


def test_single_row_projection_and_single_query():
    q, k, v = qkv_host(7, length=1, key_length=5)
    e = numpy.full((1, 5), 0.2)
    out = reflex.linformer_attention(q, k, v, e_proj=e)  # one projected key: output is F·V
    assert max_abs(out, numpy.repeat(e @ v, 2, axis=-3)) < 1e-15


def test_errors():
    q, k, v = qkv_host(8, length=5, key_length=8)
    with pytest.raises(ValueError, match=r"e_proj must have shape \(\.\.\., k, S\) with S = 8"):
        reflex.linformer_attention(q, k, v, e_proj=numpy.ones((3, 7)))
    with pytest.raises(ValueError, match="must match"):
        reflex.linformer_attention(q, k, v, e_proj=numpy.ones((3, 8)), f_proj=numpy.ones((4, 8)))
    with pytest.raises(ValueError, match="does not broadcast"):
        reflex.linformer_attention(q, k, v, e_proj=numpy.ones((3, 3, 8)))
