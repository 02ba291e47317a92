"""paged_attention: equals gathering each sequence's pages (by hand, in the test) and full attention."""

from __future__ import annotations

import numpy
import pytest

import reflex
from tests.helpers import max_abs


def _reference(q, k_cache, v_cache, block_table, cache_seqlens, *, causal=False, window=(-1, -1), softcap=None,
               sinks=None, alibi_slopes=None):
    batch, length, heads, _ = q.shape
    block_size = k_cache.shape[1]
    out = numpy.zeros((batch, length, heads, v_cache.shape[-1]))
    lse = numpy.full((batch, heads, length), -numpy.inf)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    for b in range(batch):
        n = int(cache_seqlens[b])
        if n:
            k = numpy.concatenate([k_cache[block_table[b, j]] for j in range(-(-n // block_size))])[:n]
            v = numpy.concatenate([v_cache[block_table[b, j]] for j in range(-(-n // block_size))])[:n]
            rel = numpy.arange(n)[None, :] - numpy.arange(length)[:, None] - (n - length)
            mask = numpy.ones((length, n), dtype=bool)
            if left >= 0:
                mask &= rel >= -left
            if right >= 0:
                mask &= rel <= right
            bias = None if alibi_slopes is None else -alibi_slopes[:, None, None] * numpy.abs(rel)[None]
            o, l = reflex.full_attention(numpy.transpose(q[b], (1, 0, 2)), numpy.transpose(k, (1, 0, 2)),
                                         numpy.transpose(v, (1, 0, 2)), mask=mask, bias=bias, softcap=softcap,
                                         return_lse=True, implementation="dense")
            out[b], lse[b] = numpy.transpose(o, (1, 0, 2)), l
        if sinks is not None:
            merged = numpy.logaddexp(lse[b], sinks[:, None])
            out[b] *= numpy.transpose(numpy.exp(numpy.where(numpy.isneginf(lse[b]), -numpy.inf, lse[b] - merged)))[..., None]
            lse[b] = merged
    return out, lse


CASES = reflex.get("paged").cases("tiny", 0) + reflex.get("paged").cases("small", 1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.variant)
@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_equals_gathered_pages_and_full_attention(case, implementation, small_tiles):
    out, lse = case.call(reflex.get("paged"), return_lse=True, implementation=implementation)
    params = dict(case.params)
    window = tuple(params.pop("window", (-1, -1)))
    ref_out, ref_lse = _reference(*(case.inputs[n] for n in case.positional), window=window,
                                  sinks=case.inputs.get("sinks"), alibi_slopes=case.inputs.get("alibi_slopes"), **params)
    assert numpy.isfinite(out).all(), "a NaN from an unused cache slot leaked"
    assert max_abs(out, ref_out) <= 1e-15
    assert max_abs(lse, ref_lse) <= 1e-14


def test_backends(backend):
    m = reflex.get("paged")
    for case in m.cases("tiny", 2):
        host = case.call(m)
        got = case.call(m, lambda a: backend.asarray(a) if isinstance(a, numpy.ndarray) else a)
        assert max_abs(backend.to_numpy(got), host) <= 1e-15


def test_gather_pages_reads_the_table_in_order():
    k_cache = numpy.arange(3 * 2 * 1 * 1, dtype=numpy.float64).reshape(3, 2, 1, 1)
    table = numpy.array([[2, 0], [1, 1]], dtype=numpy.int32)
    got = reflex.gather_pages(k_cache, table, numpy.array([3, 2], dtype=numpy.int32))[..., 0, 0]
    assert numpy.array_equal(got[0, :3], [4.0, 5.0, 0.0]) and numpy.array_equal(got[1, :2], [2.0, 3.0])


def test_errors():
    case = reflex.get("paged").cases("tiny", 0)[0]
    q, k_cache, v_cache, table, seqlens = (case.inputs[n] for n in case.positional)
    bad = table.copy()
    bad[0, 0] = k_cache.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[0\] lists block ids"):
        reflex.paged_attention(q, k_cache, v_cache, bad, seqlens)
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\]"):
        reflex.paged_attention(q, k_cache, v_cache, table, seqlens + 1000)
    with pytest.raises(TypeError, match="block_table must be an integer array"):
        reflex.paged_attention(q, k_cache, v_cache, table.astype(numpy.float64), seqlens)
    with pytest.raises(ValueError, match=r"q must have shape \(B, L, H, D\)"):
        reflex.paged_attention(q[0], k_cache, v_cache, table, seqlens)
    unused = table.copy()
    unused[1, :] = -7  # sequence 1 is empty: its table entries are never read
    assert max_abs(reflex.paged_attention(q, k_cache, v_cache, unused, seqlens),
                   reflex.paged_attention(q, k_cache, v_cache, table, seqlens)) == 0.0


@pytest.mark.parametrize("case", reflex.get("paged").cases("tiny", 0), ids=lambda c: c.variant)
def test_gradients_match_finite_differences(case):
    from tests.helpers import assert_vjp_matches_finite_differences

    out, lse = case.call(reflex.get("paged"), return_lse=True)
    rng = numpy.random.default_rng(7)
    grads = assert_vjp_matches_finite_differences("paged", dict(case.inputs), rng.standard_normal(out.shape),
                                                  d_lse=rng.standard_normal(lse.shape), params=case.params,
                                                  max_entries=60)
    unread = numpy.isnan(case.inputs["k_cache"])
    assert numpy.all(grads["k_cache"][unread] == 0) and numpy.all(grads["v_cache"][numpy.isnan(case.inputs["v_cache"])] == 0)


def test_a_block_shared_by_two_sequences_gets_both_gradients():
    """Prefix caching: two sequences list the same physical block; its gradient is the sum."""
    rng = numpy.random.default_rng(9)
    k_cache, v_cache = rng.standard_normal((3, 2, 1, 4)), rng.standard_normal((3, 2, 1, 4))
    table = numpy.array([[0, 1], [0, 2]], dtype=numpy.int32)
    seqlens = numpy.array([4, 3], dtype=numpy.int32)
    q = rng.standard_normal((2, 1, 2, 4))
    d_out = rng.standard_normal((2, 1, 2, 4))
    inputs = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": table, "cache_seqlens": seqlens}
    both = reflex.vjp("paged", inputs, d_out)
    first = reflex.vjp("paged", {**inputs, "block_table": table[:1], "cache_seqlens": seqlens[:1], "q": q[:1]}, d_out[:1])
    second = reflex.vjp("paged", {**inputs, "block_table": table[1:], "cache_seqlens": seqlens[1:], "q": q[1:]}, d_out[1:])
    assert max_abs(both["k_cache"], first["k_cache"] + second["k_cache"]) <= 1e-15


def test_gradients_on_every_backend(backend):
    case = reflex.get("paged").cases("tiny", 0)[3]  # sinks and ALiBi
    out = case.call(reflex.get("paged"))
    d_out = numpy.random.default_rng(8).standard_normal(out.shape)
    host = reflex.vjp("paged", dict(case.inputs), d_out, **case.params)
    got = reflex.vjp("paged", {n: backend.asarray(a) for n, a in case.inputs.items()}, backend.asarray(d_out),
                     **case.params)
    assert set(got) == {"q", "k_cache", "v_cache", "sinks", "alibi_slopes"}
    for name, g in host.items():
        assert max_abs(backend.to_numpy(got[name]), g) <= 1e-13
