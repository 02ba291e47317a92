"""cosformer_attention: explicit cos re-weighting on every backend, forms agree, eps floor, errors."""

from __future__ import annotations

import math

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from tests.helpers import max_abs, qkv_host

FORMS = ["parallel", "recurrent", "quadratic"]


def naive(q, k, v, *, offset=None, eps=1e-6):
    """Qin 2022 eq. 9 with the (L, S) matrix relu(q)·relu(k)·cos(π/2·(i' − j)/M), M = max(L, S)."""
    r = q.shape[-3] // k.shape[-3]
    k, v = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    length, key_length = q.shape[-2], k.shape[-2]
    rows = numpy.arange(length)[:, None] + (0 if offset is None else offset)
    cols = numpy.arange(key_length)[None, :]
    a = numpy.maximum(q, 0) @ numpy.swapaxes(numpy.maximum(k, 0), -1, -2)
    a = a * numpy.cos(math.pi / 2 * (rows - cols) / max(length, key_length))
    if offset is not None:
        a = a * (cols <= rows)
    out = (a @ v) / numpy.maximum(a.sum(-1, keepdims=True), eps)
    return out


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("shape", [(6, 9), (9, 4)])
def test_matches_explicit_reweighting_on_every_backend(backend, form, causal, shape):
    q, k, v = qkv_host(1, length=shape[0], key_length=shape[1])
    out = reflex.cosformer_attention(*(backend.asarray(a) for a in (q, k, v)), causal=causal, implementation=form)
    offset = None if not causal else 0 if causal == "top_left" else shape[1] - shape[0]
    assert max_abs(backend.to_numpy(out), naive(q, k, v, offset=offset)) < 1e-13


@given(length=st.integers(1, 12), key_length=st.integers(1, 12), alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_recurrent_equals_parallel(length, key_length, alignment):
    q, k, v = qkv_host(2, length=length, key_length=key_length)
    parallel = reflex.cosformer_attention(q, k, v, causal=alignment)
    assert max_abs(parallel, reflex.cosformer_attention(q, k, v, causal=alignment, implementation="recurrent")) <= 1e-12
    assert max_abs(parallel, reflex.cosformer_attention(q, k, v, causal=alignment, implementation="quadratic")) <= 1e-12


def test_eps_floor_gives_zero_not_nan():
    q, k, v = qkv_host(3)
    out = reflex.cosformer_attention(-numpy.abs(q), k, v)  # relu(q) = 0: numerator and denominator 0
    assert numpy.all(out == 0)


def test_errors():
    q, k, v = qkv_host(4)
    with pytest.raises(ValueError, match="eps"):
        reflex.cosformer_attention(q, k, v, eps=0.0)
    with pytest.raises(ValueError, match="implementation"):
        reflex.cosformer_attention(q, k, v, implementation="dense")
