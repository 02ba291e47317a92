"""Oracle integrity under hostile input: one typed-option layer, overflow refused, norms stable.

Each fault kind found by fuzzing every registered mechanism is a test here, over every mechanism
where the kind applies (the examples the fuzz found are regression cases).
"""

from __future__ import annotations

import inspect

import numpy
import pytest

import reflex
from reflex.mechanisms._numerics import vector_norm
from reflex.mechanisms._options import MAX_INT, _check_output_dtype
from reflex.registry import Case
from tests.helpers import max_abs, qkv_host

MECHANISMS = [m.key for m in reflex.list_mechanisms()]


def _params(key):
    return inspect.signature(reflex.get(key).function).parameters


def _first_case(key):
    return reflex.get(key).cases("tiny", 0)[0]


@pytest.mark.parametrize("key", MECHANISMS)
def test_every_mechanism_goes_through_the_option_layer(key):
    function = reflex.get(key).function
    assert getattr(function, "__wrapped__", None) is not None, f"{key}: decorate {function.__name__} with @typed_options"


@pytest.mark.parametrize("key", [k for k in MECHANISMS if "causal" in _params(k)])
@pytest.mark.parametrize("bad", ["False", "yes", "top-left", 1, 0.0])
def test_causal_is_not_silently_truthy(key, bad):
    case = _first_case(key)
    with pytest.raises((TypeError, ValueError), match="causal"):
        case.call(reflex.get(key), causal=bad)


def test_alibi_string_causal_sets_the_alignment():
    q, k, v = qkv_host(0, length=3, key_length=6)
    top_left = reflex.alibi_attention(q, k, v, causal=True, alignment="top_left")
    assert max_abs(reflex.alibi_attention(q, k, v, causal="top_left"), top_left) == 0.0
    bottom_right = reflex.alibi_attention(q, k, v, causal=True, alignment="bottom_right")
    assert max_abs(top_left, bottom_right) > 0.1  # the two conventions differ on L = 3, S = 6
    with pytest.raises(ValueError, match="conflicts with alignment"):
        reflex.alibi_attention(q, k, v, causal="top_left", alignment="bottom_right")


def test_top_left_only_mechanisms_refuse_bottom_right():
    x = numpy.ones((1, 2, 4, 3))
    w = numpy.ones((3, 3))
    with pytest.raises(ValueError, match="bottom_right"):
        reflex.average_attention(x, w, causal="bottom_right")


@pytest.mark.parametrize("call", [
    lambda q, k, v: reflex.dilated_attention(q, k, v, window=(2, 2), dilation=10**18),
    lambda q, k, v: reflex.longformer_attention(q, k, v, window=4, dilation=10**18),
    lambda q, k, v: reflex.block_local_attention(q, k, v, block_size=10**18),
    lambda q, k, v: reflex.lsh_attention(q, v, n_buckets=2, chunk_length=10**18),
])
def test_huge_integers_are_refused_before_any_allocation(call):
    q, k, v = qkv_host(0, length=6, key_length=6, kv_heads=4)
    with pytest.raises(ValueError, match=f"<= {MAX_INT}"):  # refused by the option layer: no hang, no allocation
        call(q, k, v)


@pytest.mark.parametrize("bad", [3.5, True, "3", numpy.float64(2.0)])
def test_integers_are_integers(bad):
    table = numpy.ones((32, 4))
    with pytest.raises(TypeError, match="query_offset must be an int"):
        reflex.t5_bias(table, 3, 4, query_offset=bad)
    q, k, v = qkv_host(0, length=6, key_length=6)
    with pytest.raises(TypeError, match="block_size must be an int"):
        reflex.block_local_attention(q, k, v, block_size=bad)


def test_numpy_integers_are_accepted():
    q, k, v = qkv_host(0, length=6, key_length=6)
    a = reflex.block_local_attention(q, k, v, block_size=numpy.int64(2))
    assert max_abs(a, reflex.block_local_attention(q, k, v, block_size=2)) == 0.0


@pytest.mark.parametrize("key", [k for k in MECHANISMS if "scale" in _params(k)])
def test_scale_must_be_finite(key):
    case = _first_case(key)
    for bad in (float("nan"), float("inf"), "1.0"):
        with pytest.raises((TypeError, ValueError), match="scale"):
            case.call(reflex.get(key), scale=bad)


@pytest.mark.parametrize("key", ["performer", "rfa", "nystrom"])
def test_square_root_scales_must_be_positive(key):
    with pytest.raises(ValueError, match="scale must be > 0"):
        _first_case(key).call(reflex.get(key), scale=-1.0)


@pytest.mark.parametrize("key", [k for k in MECHANISMS if "compute_dtype" in _params(k)])
@pytest.mark.parametrize("bad", [3, numpy.int64, numpy.complex128, "int32", True])
def test_compute_dtype_is_a_real_floating_dtype(key, bad):
    with pytest.raises((TypeError, ValueError), match="compute_dtype"):
        _first_case(key).call(reflex.get(key), compute_dtype=bad)


@pytest.mark.parametrize("key", MECHANISMS)
@pytest.mark.parametrize("bad", [None, [[1.0, 2.0]], "q", numpy.ma.masked_array(numpy.ones((1, 2, 3, 4)))])
def test_positional_arrays_must_be_arrays(key, bad):
    case = _first_case(key)
    first = case.positional[0]
    broken = Case(case.variant, {**case.inputs, first: bad}, case.params, case.positional, case.seed)
    with pytest.raises(TypeError, match=first):
        broken.call(reflex.get(key))


def test_option_arrays_refuse_complex_int_and_other_libraries():
    q, k, v = qkv_host(0, length=6, key_length=6)
    projection = numpy.ones((4, 5))
    with pytest.raises(TypeError, match="projection must be a real floating array.*complex"):
        reflex.performer_attention(q, k, v, projection=projection.astype(numpy.complex128))
    with pytest.raises(TypeError, match="projection must be a real floating array"):
        reflex.performer_attention(q, k, v, projection=projection.astype(numpy.int64))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="projection comes from a different array library"):
        reflex.performer_attention(q, k, v, projection=torch.ones((4, 5), dtype=torch.float64))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy reports the overflow it is asked to compute
@pytest.mark.parametrize("key", [k for k in MECHANISMS if _first_case(k).positional[:3] == ("q", "k", "v")])
def test_overflowing_scores_raise_instead_of_nan(key):
    case = _first_case(key)
    huge = {name: (a * 1e160 if name in ("q", "k") else a) for name, a in case.inputs.items()}
    m = reflex.get(key)
    try:
        out = Case(case.variant, huge, case.params, case.positional, case.seed).call(m)
    except FloatingPointError as err:
        assert "overflow" in str(err)
        return
    out = out[0] if isinstance(out, tuple) else out
    assert numpy.all(numpy.isfinite(numpy.asarray(out))), f"{key}: NaN/inf returned silently"


def test_nan_in_is_nan_out_not_an_error():
    q, k, v = qkv_host(0, length=4, key_length=5)
    q = q.copy()
    q[0, 0, 0, 0] = numpy.nan
    out = reflex.full_attention(q, k, v)
    assert numpy.isnan(out[0, 0, 0]).all() and numpy.isfinite(out[1]).all()


@pytest.mark.parametrize("factor", [1e8, 1e16, 1e19])
def test_relative_shaw_stays_exact_at_huge_scores(factor):
    """The value term's shares once used exp(s − lse) unshifted: off by 50 at ×1e16, inf from ×1e19."""
    q, k, v = qkv_host(0, length=6, key_length=6)
    rng = numpy.random.default_rng(0)
    rel_k, rel_v = rng.standard_normal((5, 5)), rng.standard_normal((5, 3))
    got = reflex.relative_shaw_attention(q * factor, k, v, rel_k=rel_k, rel_v=rel_v)
    i, j = numpy.arange(6)[:, None], numpy.arange(6)[None]
    r = numpy.clip(j - i, -2, 2) + 2
    kk, vv = numpy.repeat(k, 2, axis=-3), numpy.repeat(v, 2, axis=-3)
    qs = q * factor / numpy.sqrt(5)
    s = qs @ numpy.swapaxes(kk, -1, -2) + numpy.einsum("...id,ijd->...ij", qs, rel_k[r])
    w = numpy.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = w @ vv + numpy.einsum("...ij,ije->...ie", w, rel_v[r])
    assert max_abs(got, ref) <= 1e-12


def test_vector_norm_is_stable():
    xp = numpy
    x = numpy.array([[3.0, 4.0], [3e200, 4e200], [3e-200, 4e-200], [0.0, 0.0]])
    got = vector_norm(xp, x, keepdims=False)
    numpy.testing.assert_allclose(got, [5.0, 5e200, 5e-200, 0.0], rtol=1e-15)


def test_rfa_and_clustering_survive_huge_norms():
    q, k, v = qkv_host(3, length=8, key_length=8)
    base = reflex.rfa_attention(q, k, v, seed=0)
    assert max_abs(reflex.rfa_attention(q * 1e200, k * 1e200, v, seed=0), base) < 1e-12
    from reflex.mechanisms._kmeans import assign

    x = numpy.random.default_rng(0).standard_normal((2, 16, 4))
    centroids = x[:, :3]
    assert numpy.array_equal(assign(x * 1e200, centroids * 1e200), assign(x, centroids))


def test_a_library_that_cannot_hold_float64_is_refused():
    """JAX without x64 returns float32 for a float64 request: never label that float64."""
    with pytest.raises(TypeError, match="float64"):
        _check_output_dtype("full_attention", None, numpy.ones(3, dtype=numpy.float32))
    _check_output_dtype("full_attention", "float32", numpy.ones(3, dtype=numpy.float32))  # asked for float32: fine
    jax = pytest.importorskip("jax")
    if jax.config.jax_enable_x64:
        pytest.skip("x64 is enabled in this process")
    jnp = jax.numpy
    q, k, v = (jnp.asarray(a, dtype=jnp.float32) for a in qkv_host(0, length=3, key_length=4))
    with pytest.raises(TypeError, match="jax_enable_x64"):
        reflex.full_attention(q, k, v)


def test_low_precision_emulation_overflows_as_that_dtype():
    """compute_dtype=float16 emulates a float16 kernel: its overflow is the answer, not an error."""
    q, k, v = qkv_host(0, length=3, key_length=4)
    out = reflex.full_attention(q * 300, k * 300, v, compute_dtype="float16")
    assert not numpy.all(numpy.isfinite(numpy.asarray(out, dtype=numpy.float64)))
    with pytest.raises(FloatingPointError):
        reflex.full_attention(q * 1e160, k * 1e160, v)


@pytest.mark.parametrize("key,name", [("talking_heads", "v"), ("talking_heads", "k"), ("performer", "k"),
                                      ("probsparse", "v")])
def test_formula_mechanisms_keep_unattended_non_finite_keys_inert(key, name):
    """NaN in the last key/value under causal masking reaches only the rows that attend it.

    (probsparse's *keys* are read by its query selection, and predictive's convolved maps weigh every
    key: there a non-finite key legitimately changes every row.)"""
    m = reflex.get(key)
    case = next(c for c in m.cases("tiny", 0) if c.params.get("causal"))
    base = m.function(*(case.inputs[n] for n in case.positional),
                      **{n: a for n, a in case.inputs.items() if n not in case.positional}, **case.params)
    base = numpy.asarray(base[0] if isinstance(base, tuple) else base)
    target = name if name in case.inputs else case.positional[-1]
    poisoned = case.inputs[target].copy()
    poisoned[..., -1, :] = numpy.nan
    inputs = {**case.inputs, target: poisoned}
    out = m.function(*(inputs[n] for n in case.positional), **{n: a for n, a in inputs.items() if n not in case.positional},
                     **case.params)
    out = numpy.asarray(out[0] if isinstance(out, tuple) else out)
    hit = ~numpy.isfinite(out).all(axis=-1)
    assert hit.sum() < hit.size, f"{key}: NaN in one {target} row leaked into every row"
    assert max_abs(out[~hit], base[~hit]) <= 1e-13
