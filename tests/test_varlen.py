"""varlen_attention: packed sequences equal a per-sequence loop of the dense reference."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs


def _loop(q, k, v, cu_q, cu_k, *, causal=False, alignment="bottom_right", window=(-1, -1), softcap=None, sinks=None,
          alibi_slopes=None, scale=None):
    """Per sequence: dense attention with an explicit mask and bias built from positions (host NumPy)."""
    heads = q.shape[1]
    out = numpy.zeros((q.shape[0], heads, v.shape[2]))
    lse = numpy.full((heads, q.shape[0]), -numpy.inf)
    left, right = (-1 if w is None else w for w in window)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    for b in range(len(cu_q) - 1):
        a, z, a2, z2 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if z == a:
            continue
        lq, lk = z - a, z2 - a2
        delta = lk - lq if alignment == "bottom_right" else 0
        rel = numpy.arange(lk)[None, :] - numpy.arange(lq)[:, None] - delta
        mask = numpy.ones((lq, lk), dtype=bool)
        if left >= 0:
            mask &= rel >= -left
        if right >= 0:
            mask &= rel <= right
        bias = None if alibi_slopes is None else -alibi_slopes[:, None, None] * numpy.abs(rel)[None]
        qq, kk, vv = (numpy.transpose(x, (1, 0, 2)) for x in (q[a:z], k[a2:z2], v[a2:z2]))
        o, l = reflex.full_attention(qq, kk, vv, mask=mask, bias=bias, softcap=softcap, scale=scale, return_lse=True,
                                     implementation="dense")
        if sinks is not None:  # an extra column with logit s_h and no value
            total = numpy.logaddexp(l, sinks[:, None])
            o = o * numpy.exp(numpy.where(numpy.isinf(l), -numpy.inf, l - total))[..., None]
            l = total
        out[a:z] = numpy.transpose(o, (1, 0, 2))
        lse[:, a:z] = l
    if sinks is not None:
        empty = numpy.isneginf(lse)
        lse = numpy.where(empty, sinks[:, None], lse)
    return out, lse


CASES = reflex.get("varlen").cases("tiny", 0) + reflex.get("varlen").cases("small", 1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.variant)
@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_equals_a_per_sequence_loop(case, implementation, small_tiles):
    inputs = case.inputs
    out, lse = case.call(reflex.get("varlen"), return_lse=True, implementation=implementation)
    params = {**case.params}
    window = tuple(params.pop("window", (-1, -1)))
    ref_out, ref_lse = _loop(*(inputs[n] for n in case.positional), window=window, sinks=inputs.get("sinks"),
                             alibi_slopes=inputs.get("alibi_slopes"), **params)
    assert max_abs(out, ref_out) <= 1e-15
    assert max_abs(lse, ref_lse) <= 1e-14


def test_backends(backend):
    m = reflex.get("varlen")
    for case in m.cases("tiny", 2):
        host = case.call(m, return_lse=True)
        got = case.call(m, lambda a: backend.asarray(a) if isinstance(a, numpy.ndarray) else a, return_lse=True)
        assert max_abs(backend.to_numpy(got[0]), host[0]) <= 1e-15
        assert max_abs(backend.to_numpy(got[1]), host[1]) <= 1e-15


def test_no_token_sees_another_sequence():
    """Changing a sequence's keys and values never changes another sequence's output."""
    case = reflex.get("varlen").cases("tiny", 0)[0]
    q, k, v, cu_q, cu_k = (case.inputs[n] for n in case.positional)
    base = reflex.varlen_attention(q, k, v, cu_q, cu_k)
    k2, v2 = k.copy(), v.copy()
    k2[cu_k[0]:cu_k[1]] = numpy.nan
    v2[cu_k[0]:cu_k[1]] = numpy.inf
    changed = reflex.varlen_attention(q, k2, v2, cu_q, cu_k)
    assert max_abs(changed[cu_q[1]:], base[cu_q[1]:]) <= 1e-15  # the careful (non-finite) path may round differently


def test_zero_length_and_empty_batches():
    q = random.normal((0, 2, 4), seed=0)
    k = random.normal((0, 2, 4), seed=1)
    v = random.normal((0, 2, 3), seed=2)
    cu = numpy.array([0, 0, 0], dtype=numpy.int32)
    out, lse = reflex.varlen_attention(q, k, v, cu, cu, return_lse=True)
    assert out.shape == (0, 2, 3) and lse.shape == (2, 0)
    # queries whose sequence has no key: 0 and -inf; with a sink, lse = s_h
    q = random.normal((3, 2, 4), seed=3)
    out, lse = reflex.varlen_attention(q, k, v, numpy.array([0, 3], dtype=numpy.int32), numpy.array([0, 0], dtype=numpy.int32),
                                       return_lse=True, sinks=numpy.array([0.5, -1.0]))
    assert numpy.all(out == 0) and numpy.array_equal(lse, numpy.array([[0.5] * 3, [-1.0] * 3]))


def test_bad_offsets_are_refused():
    case = reflex.get("varlen").cases("tiny", 0)[0]
    q, k, v, cu_q, cu_k = (case.inputs[n] for n in case.positional)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        reflex.varlen_attention(q, k, v, cu_q[::-1].copy(), cu_k)
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing prefix sums from 0 to"):
        reflex.varlen_attention(q, k, v, cu_q, cu_k + 1)
    with pytest.raises(ValueError, match="describes"):
        reflex.varlen_attention(q, k, v, cu_q, numpy.array([0, k.shape[0]], dtype=numpy.int32))
    with pytest.raises(TypeError, match="cu_seqlens_q must be an integer array"):
        reflex.varlen_attention(q, k, v, cu_q.astype(numpy.float64), cu_k)
    with pytest.raises(ValueError, match="packed shape"):
        reflex.varlen_attention(q[None], k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="sinks must have shape"):
        reflex.varlen_attention(q, k, v, cu_q, cu_k, sinks=numpy.zeros(3))


def test_window_accepts_none_for_an_unbounded_side():
    case = reflex.get("varlen").cases("tiny", 0)[0]
    args = [case.inputs[n] for n in case.positional]
    assert max_abs(reflex.varlen_attention(*args, window=(None, 1)), reflex.varlen_attention(*args, window=(-1, 1))) == 0.0


@pytest.mark.parametrize("case", reflex.get("varlen").cases("tiny", 0), ids=lambda c: c.variant)
def test_gradients_match_finite_differences(case):
    from tests.helpers import assert_vjp_matches_finite_differences

    out, lse = case.call(reflex.get("varlen"), return_lse=True)
    rng = numpy.random.default_rng(7)
    assert_vjp_matches_finite_differences("varlen", dict(case.inputs), rng.standard_normal(out.shape),
                                          d_lse=rng.standard_normal(lse.shape), params=case.params, max_entries=60)


def test_gradients_on_every_backend(backend):
    case = reflex.get("varlen").cases("tiny", 0)[-1]  # sinks and ALiBi
    out = case.call(reflex.get("varlen"))
    d_out = numpy.random.default_rng(8).standard_normal(out.shape)
    host = reflex.vjp("varlen", dict(case.inputs), d_out, **case.params)
    got = reflex.vjp("varlen", {n: backend.asarray(a) for n, a in case.inputs.items()}, backend.asarray(d_out),
                     **case.params)
    assert set(got) == {"q", "k", "v", "sinks", "alibi_slopes"}
    for name, g in host.items():
        assert max_abs(backend.to_numpy(got[name]), g) <= 1e-13
