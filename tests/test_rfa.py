"""rfa_attention: the paper's recurrence in NumPy, forms agree (gated and not), limits, errors."""

from __future__ import annotations

import math

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host

FORMS = ["parallel", "recurrent", "quadratic"]


def naive_recurrence(q, k, v, omega, *, gate=None, offset=None, scale=None):
    """Peng 2021 eq. 5/7 literally: normalise, features, loop over keys updating (S, z)."""
    r = q.shape[-3] // k.shape[-3]
    k, v = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    if gate is not None:
        gate = numpy.repeat(gate, r, axis=-2)
    root = math.sqrt(1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    m = omega.shape[0]

    def phi(x):
        u = root * (x / numpy.linalg.norm(x, axis=-1, keepdims=True)) @ omega.T
        return numpy.concatenate([numpy.sin(u), numpy.cos(u)], -1) / math.sqrt(m)

    fq, fk = phi(q), phi(k)
    length, key_length = q.shape[-2], k.shape[-2]
    state = numpy.zeros((*q.shape[:-2], 2 * m, v.shape[-1]))
    norm = numpy.zeros((*q.shape[:-2], 2 * m))
    out = numpy.zeros((*q.shape[:-1], v.shape[-1]))
    reads = {}
    for t in range(key_length):
        upd, zu = fk[..., t, :, None] * v[..., t, None, :], fk[..., t, :]
        if gate is None:
            state, norm = state + upd, norm + zu
        else:
            g = gate[..., t]
            state = g[..., None, None] * state + (1 - g)[..., None, None] * upd
            norm = g[..., None] * norm + (1 - g)[..., None] * zu
        reads[t] = (state, norm)
    for i in range(length):
        t = key_length - 1 if offset is None else min(i + offset, key_length - 1)
        if t < 0:
            continue
        s, z = reads[t]
        out[..., i, :] = numpy.einsum("...f,...fe->...e", fq[..., i, :], s) / numpy.einsum("...f,...f->...", fq[..., i, :], z)[..., None]
    return out


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("causal,gated", [(False, False), ("top_left", False), ("top_left", True), ("bottom_right", True)])
def test_matches_recurrence_on_every_backend(backend, form, causal, gated):
    q, k, v = qkv_host(1, length=6, key_length=9)
    omega = random.normal((10, 5), seed=2)
    gate = random.uniform((2, 2, 9), seed=3) if gated else None
    extra = {"gate": backend.asarray(gate)} if gated else {}
    out = reflex.rfa_attention(*(backend.asarray(a) for a in (q, k, v)), projection=backend.asarray(omega),
                               causal=causal, implementation=form, **extra)
    offset = None if not causal else 0 if causal == "top_left" else 3
    assert max_abs(backend.to_numpy(out), naive_recurrence(q, k, v, omega, gate=gate, offset=offset)) < 1e-12


@given(length=st.integers(1, 10), key_length=st.integers(1, 10), gated=st.booleans(),
       alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_recurrent_equals_parallel(length, key_length, gated, alignment):
    q, k, v = qkv_host(4, length=length, key_length=key_length)
    gate = random.uniform((2, 2, key_length), seed=5) if gated else None
    kwargs = dict(num_features=12, seed=6, causal=alignment, gate=gate)
    parallel = reflex.rfa_attention(q, k, v, **kwargs)
    assert max_abs(parallel, reflex.rfa_attention(q, k, v, **kwargs, implementation="recurrent")) <= 1e-12
    assert max_abs(parallel, reflex.rfa_attention(q, k, v, **kwargs, implementation="quadratic")) <= 1e-12


def test_gated_scan_over_many_blocks():
    """The log-depth gated scan, several key blocks and zero gates: equal to the recurrence."""
    from reflex.mechanisms import _kernels, linear

    q, k, v = qkv_host(7, length=13, key_length=17)
    gate = random.uniform((2, 2, 17), seed=8)
    gate[..., 5] = 0.0  # forget everything before key 5
    p = _kernels.prepare(q, k, v)
    g = linear.check_gate(p, gate)
    qg, kg, _ = linear.grouped(p)
    phi = lambda x: numpy.concatenate([numpy.sin(x), numpy.cos(x)], -1)  # noqa: E731
    run = lambda form, block: linear._kernelized(  # noqa: E731
        p, lambda i0, i1: phi(qg[..., i0:i1, :]), lambda j0, j1: phi(kg[..., j0:j1, :]), lambda n, d: n / d,
        offset=2, form=form, gate=g, block=block)
    recurrent = run("recurrent", None)
    for block in (1, 2, 3, 5, 8, 64):
        assert max_abs(run("parallel", block), recurrent) <= 1e-12


def test_zero_gate_returns_the_latest_value():
    """g = 0 keeps only the newest key: the output is v_{i+δ} exactly (up to round-off)."""
    q, k, v = qkv_host(9, length=5, key_length=5)
    out = reflex.rfa_attention(q, k, v, seed=1, gate=numpy.zeros((2, 2, 5)), causal=True)
    assert max_abs(out, numpy.repeat(v, 2, axis=-3)) < 1e-12


def test_many_features_approach_softmax_on_normalised_inputs():
    q, k, v = qkv_host(10, batch=(4,), length=6, key_length=6, dim=4)
    unit = lambda x: x / numpy.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    full = reflex.full_attention(unit(q), unit(k), v, scale=1.0)
    errors = [numpy.max(numpy.abs(reflex.rfa_attention(q, k, v, num_features=m, seed=11, scale=1.0) - full))
              for m in (16, 256, 4096)]
    assert errors[2] < errors[1] < errors[0] and errors[2] < 0.05, errors


def test_errors():
    q, k, v = qkv_host(12)
    with pytest.raises(ValueError, match="gate needs causal"):
        reflex.rfa_attention(q, k, v, seed=1, gate=numpy.ones((2, 2, 9)))
    with pytest.raises(ValueError, match=r"gate must have shape \(\.\.\., G, S\)"):
        reflex.rfa_attention(q, k, v, seed=1, gate=numpy.ones((2, 4, 9)), causal=True)
    with pytest.raises(ValueError, match=r"gate values must lie in \[0, 1\]"):
        reflex.rfa_attention(q, k, v, seed=1, gate=numpy.full((2, 2, 9), 1.5), causal=True)
    with pytest.raises(ValueError, match="projection"):
        reflex.rfa_attention(q, k, v)
