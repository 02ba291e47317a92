"""A key that a row does not attend never influences that row (issue 11, item 2).

NaN/±inf stored in K or V where a row does not attend (masked, outside the window, beyond causal,
padding) must not reach that row's output or lse on any kernel; rows that do attend a non-finite
entry still get NaN/±inf.
"""

from __future__ import annotations

import math

import numpy
import pytest

import reflex
from reflex.mechanisms.full import full_attention
from reflex.mechanisms.sliding_window import sliding_window_attention
from reflex.registry import Case
from tests.helpers import max_abs, qkv_host


def _issue_example():
    q, k, v = qkv_host(11, batch=(1,), heads=2, kv_heads=2, length=4, key_length=7, dim=4, value_dim=4)
    mask = numpy.ones((1, 2, 4, 7), dtype=bool)
    mask[..., [2, 5]] = False
    return q, k, v, mask


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
@pytest.mark.parametrize("where", ["v", "k", "both"])
def test_full_masked_nan_slots_are_inert(backend, implementation, where, small_tiles):
    q, k, v, mask = _issue_example()
    k2, v2 = k.copy(), v.copy()
    if where in ("v", "both"):
        v2[..., [2, 5], :] = math.nan
    if where in ("k", "both"):
        k2[..., 2, 0] = math.inf
        k2[..., 5, 1] = math.nan
    a = backend.asarray
    ref_out, ref_lse = full_attention(a(q), a(k), a(v), mask=a(mask), implementation=implementation, return_lse=True)
    out, lse = full_attention(a(q), a(k2), a(v2), mask=a(mask), implementation=implementation, return_lse=True)
    out, lse = backend.to_numpy(out), backend.to_numpy(lse)
    assert numpy.all(numpy.isfinite(out)) and numpy.all(numpy.isfinite(lse))
    assert max_abs(out, backend.to_numpy(ref_out)) <= 1e-15
    assert max_abs(lse, backend.to_numpy(ref_lse)) <= 1e-15


def test_bias_minus_inf_is_a_mask_for_nonfinite_values():
    q, k, v, mask = _issue_example()
    bias = numpy.where(mask, 0.0, -math.inf)
    v2 = v.copy()
    v2[..., [2, 5], :] = math.nan
    for implementation in ("dense", "tiled"):
        out = full_attention(q, k, v2, bias=bias, implementation=implementation)
        assert max_abs(out, full_attention(q, k, v, mask=mask, implementation=implementation)) <= 1e-15


@pytest.mark.parametrize("implementation", ["dense", "tiled", "gather", "numpy", "numba"])
def test_sliding_window_outside_the_window_is_inert(implementation):
    q, k, v, _ = _issue_example()
    v2, k2 = v.copy(), k.copy()
    v2[..., 4:, :] = math.nan  # window (1, 0) at L = 4: keys 4..6 are never attended
    k2[..., 5:, :] = -math.inf
    ref = sliding_window_attention(q, k, v, window=(1, 0), implementation=implementation, return_lse=True)
    got = sliding_window_attention(q, k2, v2, window=(1, 0), implementation=implementation, return_lse=True)
    for x, y in zip(got, ref):
        assert numpy.all(numpy.isfinite(x)) and max_abs(x, y) <= 1e-15


@pytest.mark.parametrize("implementation", ["dense", "tiled", "gather", "numpy", "numba"])
def test_rows_that_attend_nonfinite_entries_get_them(implementation):
    """Garbage in, garbage out, exactly where it flows: +∞ and NaN in one value row reach the two rows
    that attend it in those columns only; a non-finite key makes its attending rows and lse NaN."""
    q, k, v, _ = _issue_example()
    v2 = v.copy()
    v2[0, 0, 1, 0] = math.inf
    v2[0, 0, 1, 1] = math.nan
    ref = sliding_window_attention(q, k, v, window=(1, 0), implementation=implementation)
    out, lse = sliding_window_attention(q, k, v2, window=(1, 0), implementation=implementation, return_lse=True)
    attending = [1, 2]  # key 1 is in the windows of queries 1 and 2 (head 0)
    assert numpy.all(out[0, 0, attending, 0] == math.inf)
    assert numpy.all(numpy.isnan(out[0, 0, attending, 1]))
    assert max_abs(out[0, 0, attending, 2:], ref[0, 0, attending, 2:]) <= 1e-15
    assert max_abs(out[0, 0, [0, 3]], ref[0, 0, [0, 3]]) <= 1e-15 and max_abs(out[0, 1], ref[0, 1]) <= 1e-15
    assert numpy.all(numpy.isfinite(lse))
    k2 = k.copy()
    k2[0, 1, 2, 3] = math.nan
    out, lse = sliding_window_attention(q, k2, v, window=(1, 0), implementation=implementation, return_lse=True)
    assert numpy.all(numpy.isnan(out[0, 1, [2, 3]])) and numpy.all(numpy.isnan(lse[0, 1, [2, 3]]))
    assert max_abs(out[0, 1, [0, 1]], ref[0, 1, [0, 1]]) <= 1e-15 and max_abs(out[0, 0], ref[0, 0]) <= 1e-15


def test_gather_padding_slots_are_inert(backend):
    from reflex.mechanisms import _kernels

    q, k, v, _ = _issue_example()
    indices = numpy.array([[0, 1, -1], [1, 3, -1], [3, 4, 6], [-1, -1, -1]])
    v2 = v.copy()
    v2[..., 0, :] = math.nan  # padding reads key 0 internally; only query 0 lists it
    a = backend.asarray
    p = _kernels.prepare(a(q), a(k), a(v2))
    out, lse = _kernels.gather(p, a(indices), scale=0.5)
    out = backend.to_numpy(out)
    assert numpy.all(numpy.isnan(out[..., 0, :])) and numpy.all(numpy.isfinite(out[..., 1:, :]))
    ref, _ = _kernels.gather(_kernels.prepare(a(q), a(k), a(v)), a(indices), scale=0.5)
    assert max_abs(out[..., 1:, :], backend.to_numpy(ref)[..., 1:, :]) <= 1e-15


# --- every mechanism with a pattern ------------------------------------------------------------

# Mechanisms whose key *selection* reads the key values themselves (k-means routing of queries and
# keys): a NaN key moves every centroid, so NaN in K is not inert there by design; NaN in V is.
SELECTS_FROM_KEYS = {"routing"}


def _pattern_cases():
    for m in reflex.list_mechanisms():
        if m.pattern is None:
            continue
        case = m.cases("tiny", 0)[0]
        if not {"k", "v"} <= set(case.inputs):
            continue  # shared-QK mechanisms (lsh): keys are the queries
        yield pytest.param(m.key, id=m.key)


def _unattended_rows(m, case):
    """``(hit (..., H, L), selected (..., G, S))``: keys that some row does not attend, and the rows
    attending any of them; ``None`` when the pattern is over other keys than k (bp_tree's nodes)."""
    inputs = dict(case.inputs)
    pattern = numpy.asarray(m.pattern(*(inputs[n] for n in case.positional),
                                      **{n: x for n, x in inputs.items() if n not in case.positional}, **case.params)) > 0
    q, k = inputs[case.positional[0]], inputs["k"]
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if pattern.shape[-1] != k.shape[-2]:
        return None
    pattern = numpy.broadcast_to(pattern, (*q.shape[:-1], k.shape[-2]))
    grouped = pattern.reshape(*pattern.shape[:-3], kv_heads, heads // kv_heads, *pattern.shape[-2:])
    selected = ~grouped.all(axis=(-3, -2))
    hit = (grouped & selected[..., None, None, :]).any(-1).reshape(q.shape[:-1])
    return hit, selected


@pytest.mark.parametrize("key", list(_pattern_cases()))
def test_every_pattern_mechanism_keeps_unattended_keys_inert(key, backend):
    m = reflex.get(key)
    case = m.cases("tiny", 0)[0]
    found = _unattended_rows(m, case)
    if found is None:
        pytest.skip(f"{key}'s pattern is over derived keys")
    hit, selected = found
    if not selected.any():
        pytest.skip(f"{key}'s first case attends every key from every row")
    for which in (("v",) if key in SELECTS_FROM_KEYS else ("v", "k")):
        poisoned = dict(case.inputs)
        for name in which:
            x = numpy.array(case.inputs[name], copy=True)
            x[selected] = math.nan
            poisoned[name] = x
        ref = case.call(m, backend.asarray)
        got = Case(case.variant, poisoned, case.params, case.positional, case.seed).call(m, backend.asarray)
        ref, got = (r[0] if isinstance(r, tuple) else r for r in (ref, got))
        ref, got = backend.to_numpy(ref), backend.to_numpy(got)
        rows = ~hit
        assert not numpy.isnan(got[rows]).any(), f"NaN in {which} leaked into rows that do not attend it"
        assert max_abs(got[rows], ref[rows]) <= 1e-13
