"""Engine options every q, k, v mechanism shares through the option layer: ``layout`` and ``sinks``."""

from __future__ import annotations

import inspect

import numpy
import pytest

import reflex
from reflex.registry import Case
from tests.helpers import assert_vjp_matches_finite_differences, max_abs, qkv_host

QKV = [m.key for m in reflex.list_mechanisms() if m.cases("tiny", 0)[0].positional[:3] == ("q", "k", "v")
       and "layout" in inspect.signature(m.function).parameters]
SINKS = [k for k in QKV if "sinks" in inspect.signature(reflex.get(k).function).parameters]


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def test_most_mechanisms_take_the_options():
    assert len(QKV) >= 45 and len(SINKS) >= 30
    assert {"full", "sliding_window", "alibi", "linear", "performer"} <= set(QKV)
    assert "varlen" not in QKV and "paged" not in QKV  # flash-attn's own packed and paged layouts


@pytest.mark.parametrize("key", QKV)
def test_flash_layout_is_the_transposed_call(key, backend):
    m = reflex.get(key)
    case = m.cases("tiny", 0)[0]
    convert = lambda a: backend.asarray(a) if isinstance(a, numpy.ndarray) else a  # noqa: E731
    expected = backend.to_numpy(_first(case.call(m, convert)))
    flash = {n: (numpy.swapaxes(a, -3, -2) if n in ("q", "k", "v") else a) for n, a in case.inputs.items()}
    got = _first(Case(case.variant, flash, case.params, case.positional, case.seed).call(m, convert, layout="blhd"))
    # a transposed (strided) view may take another BLAS path: equal to round-off, not bitwise
    assert max_abs(numpy.swapaxes(backend.to_numpy(got), -3, -2), expected) <= 1e-14


def test_bad_layout_is_refused():
    q, k, v = qkv_host(0)
    with pytest.raises(ValueError, match="layout must be 'bhld'"):
        reflex.full_attention(q, k, v, layout="bshd")


def _with_sink_column(q, k, v, sinks, mask=None):
    """The sink as one more key: k = 0 (score 0), bias s_h on that column, v = 0."""
    extra_k = numpy.zeros((*k.shape[:-2], 1, k.shape[-1]))
    extra_v = numpy.zeros((*v.shape[:-2], 1, v.shape[-1]))
    shape = (*q.shape[:-1], k.shape[-2] + 1)
    bias = numpy.zeros(shape)
    bias[..., -1] = sinks[:, None]
    if mask is not None:
        mask = numpy.concatenate([numpy.broadcast_to(mask, (*shape[:-1], k.shape[-2])),
                                  numpy.ones((*shape[:-1], 1), dtype=bool)], axis=-1)
    return reflex.full_attention(q, numpy.concatenate([k, extra_k], -2), numpy.concatenate([v, extra_v], -2),
                                 bias=bias, mask=mask, return_lse=True, implementation="dense")


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_sinks_equal_an_extra_valueless_column(implementation, small_tiles):
    q, k, v = qkv_host(1, length=5, key_length=7)
    sinks = numpy.array([0.3, -1.0, 2.0, 0.0])
    mask = numpy.random.default_rng(0).uniform(size=(5, 7)) < 0.6
    mask[2] = False  # a fully masked row: output 0, lse = s_h
    out, lse = reflex.full_attention(q, k, v, mask=mask, sinks=sinks, return_lse=True, implementation=implementation)
    ref_out, ref_lse = _with_sink_column(q, k, v, sinks, mask)
    assert max_abs(out, ref_out) <= 1e-15 and max_abs(lse, ref_lse) <= 1e-14
    assert numpy.all(out[..., 2, :] == 0) and numpy.array_equal(lse[..., 2], numpy.broadcast_to(sinks, (2, 4)))


def test_sinks_on_sliding_window_equal_full_with_the_band():
    q, k, v = qkv_host(2, length=6, key_length=6)
    sinks = numpy.array([1.0, -2.0, 0.5, 0.0])
    out = reflex.sliding_window_attention(q, k, v, window=(2, 0), sinks=sinks)
    band = reflex.get("sliding_window").pattern(q, k, v, window=(2, 0))
    assert max_abs(out, reflex.full_attention(q, k, v, mask=band, sinks=sinks)) <= 1e-15


@pytest.mark.parametrize("key", SINKS)
def test_sinks_lower_every_row_weight(key):
    """With a sink the row's weights sum to e^{L}/(e^{L}+e^{s}) < 1: the output is that share of the plain one."""
    m = reflex.get(key)
    case = m.cases("tiny", 0)[0]
    plain, lse = case.call(m, return_lse=True)
    heads = case.inputs["q"].shape[-3]
    sinks = numpy.linspace(-1.0, 1.0, heads)
    got, got_lse = case.call(m, return_lse=True, sinks=sinks)
    share = numpy.exp(numpy.where(numpy.isneginf(lse), -numpy.inf, lse - numpy.logaddexp(lse, sinks[:, None])))
    assert max_abs(got, plain * share[..., None]) <= 1e-14
    assert max_abs(got_lse, numpy.logaddexp(lse, sinks[:, None])) <= 1e-14


@pytest.mark.parametrize("key,params", [("full", {"causal": "bottom_right"}), ("sliding_window", {"window": (1, 1)}),
                                        ("alibi", {})])
def test_sink_gradient_matches_finite_differences(key, params):
    q, k, v = qkv_host(3, batch=(1,), length=4, key_length=5)
    rng = numpy.random.default_rng(4)
    inputs = {"q": q, "k": k, "v": v, "sinks": rng.standard_normal(4)}
    assert_vjp_matches_finite_differences(key, inputs, rng.standard_normal((1, 4, 4, 3)),
                                          d_lse=rng.standard_normal((1, 4, 4)), params=params)


def test_gradients_in_flash_layout():
    q, k, v = qkv_host(5, batch=(1,), length=4, key_length=5)
    d_out = numpy.random.default_rng(6).standard_normal((1, 4, 4, 3))
    plain = reflex.vjp("full", {"q": q, "k": k, "v": v}, d_out)
    flash = reflex.vjp("full", {n: numpy.swapaxes(x, 1, 2) for n, x in (("q", q), ("k", k), ("v", v))},
                       numpy.swapaxes(d_out, 1, 2), layout="blhd")
    for name in "qkv":
        assert max_abs(numpy.swapaxes(flash[name], 1, 2), plain[name]) == 0.0
