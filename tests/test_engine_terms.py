"""Every engine mechanism takes full_attention's mask/bias/softcap and padded lengths (issue 20 §1, §2).

The option layer adds the options to every q, k, v mechanism that can return an lse and lacks them
(:mod:`reflex.mechanisms._engine.extra`); these tests check, on the backend matrix, that a mechanism
run with them equals ``full_attention(mask=pattern & mask, bias=prior + bias, softcap=c)``, that a
padded batch equals a loop over each sequence's valid slices, and that the mechanisms that cannot
take them refuse with ``NotImplementedError``.
"""

from __future__ import annotations

import inspect
import math

import numpy
import pytest

import reflex
from reflex import random
from reflex.mechanisms import _kernels
from tests.helpers import assert_vjp_matches_finite_differences, max_abs, qkv_host

# Mechanisms that refuse the options in every configuration (their engine calls attend compressed,
# pooled or regrouped keys or rows), and those that refuse in some (a second pass composed after the
# first: axial over both axes, Shaw's value-side relative terms).
REFUSED = {"bp_tree", "longformer", "isab", "linformer", "memory_compressed", "compressive", "recurrent_memory"}
SOMETIMES_REFUSED = {"axial", "relative_shaw"}


def _generic(key):
    return getattr(reflex.get(key).function, "generic_terms", ())


ENGINE_KEYS = sorted(m.key for m in reflex.list_mechanisms() if {"bias", "softcap"} <= set(_generic(m.key)))


def test_option_layer_declares_the_options_once():
    signature = inspect.signature(reflex.sliding_window_attention).parameters
    for name in ("mask", "bias", "softcap", "seqlens_q", "seqlens_k", "key_leftpad"):
        assert signature[name].kind is inspect.Parameter.KEYWORD_ONLY and signature[name].default is None
    assert set(_generic("full")) == {"seqlens_q", "seqlens_k", "key_leftpad"}  # full declares the others itself
    assert _generic("varlen") == () and _generic("paged") == ()  # their own layouts
    assert {"sliding_window", "alibi", "topk", "random", "bigbird", "t5_bias"} <= set(ENGINE_KEYS)


def _own_terms_reference(m, case, args, inputs, mask, bias, softcap):
    """``full_attention`` on the recorded engine call of a plain run, with the caller's terms composed:
    the reference for mechanisms whose pattern or prior has no registry ``pattern``."""
    with _kernels.recording() as calls:
        m.function(*args, **inputs, **case.params)
    engine = [c for c in calls if c.p is not None]
    assert len(engine) == 1 and engine[0].kernel in ("dense", "tiled"), [c.kernel for c in calls]
    call = engine[0]
    p, options = call.p, call.options
    assert options.get("softcap") is None
    xp = p.xp
    rows = xp.reshape(xp.arange(p.length, dtype=xp.int64), (p.length, 1))
    cols = xp.reshape(xp.arange(p.key_length, dtype=xp.int64), (1, p.key_length))

    def dense(term):
        value = term(rows, cols) if callable(term) and not hasattr(term, "shape") else term
        return numpy.broadcast_to(numpy.asarray(value), p.score_shape)

    own_mask = numpy.ones(p.score_shape, dtype=bool)
    for t in _as_list(options.get("mask")):
        own_mask = own_mask & dense(t)
    own_bias = numpy.zeros(p.score_shape)
    for t in _as_list(options.get("bias")):
        own_bias = own_bias + dense(t)
    return reflex.full_attention(p.q, p.k, p.v, mask=own_mask if mask is None else own_mask & mask,
                                 bias=own_bias + bias, softcap=softcap, scale=options["scale"], return_lse=True,
                                 implementation="dense")


def _as_list(t):
    if t is None:
        return []
    return [x for x in t if x is not None] if isinstance(t, (tuple, list)) else [t]


def _pattern_reference(m, case, args, inputs, mask, bias, softcap):
    """``full_attention(mask=pattern & mask, bias=log(multiplicity) + bias, softcap)`` from the registry pattern."""
    pattern = numpy.asarray(m.pattern(*args, **inputs, **case.params))
    allowed = pattern if pattern.dtype == bool else pattern > 0
    if pattern.dtype != bool:  # a key listed n times counts n times: log n added to its score
        with numpy.errstate(divide="ignore"):
            bias = bias + numpy.where(allowed, numpy.log(numpy.maximum(pattern, 1)), 0.0)
    q, k, v = args[:3]
    return reflex.full_attention(q, k, v, mask=allowed if mask is None else allowed & mask, bias=bias, softcap=softcap,
                                 scale=case.params.get("scale"), return_lse=True, implementation="dense")


@pytest.mark.parametrize("key", ENGINE_KEYS)
def test_every_engine_mechanism_composes_mask_bias_softcap(backend, key):
    m = reflex.get(key)
    takes_mask = "mask" in _generic(key)
    refused = 0
    for n, case in enumerate(m.cases("tiny", 0)[:2]):
        inputs = dict(case.inputs)
        args = [inputs.pop(name) for name in case.positional]
        q, k = args[0], args[1]
        score_shape = (*q.shape[:-1], k.shape[-2])
        mask = random.uniform(score_shape, seed=(n, 7)) < 0.8 if takes_mask else None
        bias = random.normal(score_shape, seed=(n, 8))
        options = dict(bias=backend.asarray(bias), softcap=2.5)
        if takes_mask:
            options["mask"] = backend.asarray(mask)
        moved_args = [backend.asarray(a) for a in args]
        moved_inputs = {name: backend.asarray(x) if hasattr(x, "shape") else x for name, x in inputs.items()}
        try:
            out, lse = m.function(*moved_args, **moved_inputs, **case.params, **options, return_lse=True)
        except NotImplementedError as err:
            assert key in REFUSED | SOMETIMES_REFUSED, f"{key} ({case.variant}) refused: {err}"
            assert m.function.__name__ in str(err)
            refused += 1
            continue
        assert key not in REFUSED
        if m.pattern is not None:
            ref_out, ref_lse = _pattern_reference(m, case, args, inputs, mask, bias, 2.5)
        else:
            ref_out, ref_lse = _own_terms_reference(m, case, args, inputs, mask, bias, 2.5)
        assert max_abs(backend.to_numpy(out), ref_out) <= 1e-13, (key, case.variant)
        assert max_abs(backend.to_numpy(lse), ref_lse) <= 1e-13, (key, case.variant)
    if key in REFUSED:
        assert refused == 2


def test_the_options_change_the_result():
    """The composition is not a no-op: a bias and a softcap move sliding_window's output."""
    q, k, v = qkv_host(3)
    plain = reflex.sliding_window_attention(q, k, v, window=(2, 1))
    bias = random.normal((2, 4, 7, 9), seed=(3, 4))
    assert max_abs(reflex.sliding_window_attention(q, k, v, window=(2, 1), bias=bias), plain) > 1e-3
    assert max_abs(reflex.sliding_window_attention(q, k, v, window=(2, 1), softcap=0.5), plain) > 1e-3


@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled", "gather"])
def test_sliding_window_every_kernel(backend, implementation, small_tiles):
    q, k, v = qkv_host(4, length=8, key_length=11)
    mask = random.uniform((2, 4, 8, 11), seed=(4, 5)) < 0.7
    mask[0, 1, 2, :] = False  # a fully masked row: 0 and lse −inf
    bias = random.normal((1, 4, 1, 11), seed=(4, 6))  # broadcast along batch and rows
    args = [backend.asarray(a) for a in (q, k, v)]
    out, lse = reflex.sliding_window_attention(*args, window=(3, 1), alignment="bottom_right", mask=backend.asarray(mask),
                                               bias=backend.asarray(bias), softcap=1.5, return_lse=True,
                                               implementation=implementation)
    band = reflex.get("sliding_window").pattern(q, k, v, window=(3, 1), alignment="bottom_right")
    ref_out, ref_lse = reflex.full_attention(q, k, v, mask=band & mask, bias=bias, softcap=1.5, return_lse=True)
    assert max_abs(backend.to_numpy(out), ref_out) <= 1e-13
    assert max_abs(backend.to_numpy(lse), ref_lse) <= 1e-13
    assert numpy.all(backend.to_numpy(lse)[0, 1, 2] == -math.inf)


def test_band_kernels_refuse_the_options():
    q, k, v = qkv_host(5)
    with pytest.raises(ValueError, match="implementation='numba'"):
        reflex.sliding_window_attention(q, k, v, window=(1, 1), softcap=2.0, implementation="numba")


def test_refusals_name_the_mechanism():
    q, k, v = qkv_host(6, length=8, key_length=8)
    with pytest.raises(NotImplementedError, match="linformer_attention"):
        reflex.linformer_attention(q, k, v, e_proj=random.normal((4, 8), seed=1), softcap=2.0)
    with pytest.raises(NotImplementedError, match="axial_attention makes more than one engine call"):
        reflex.axial_attention(q, k, v, shape=(2, 4), softcap=2.0)


def test_bad_options_are_refused():
    q, k, v = qkv_host(7)
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        reflex.sliding_window_attention(q, k, v, window=(1, 1), mask=numpy.ones((7, 9)))
    with pytest.raises(ValueError, match="bias of shape"):
        reflex.sliding_window_attention(q, k, v, window=(1, 1), bias=numpy.ones((7, 8)))
    with pytest.raises(ValueError, match="softcap"):
        reflex.sliding_window_attention(q, k, v, window=(1, 1), softcap=-1.0)


# --- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key,params", [("sliding_window", {"window": (2, 1), "softcap": 1.5}),
                                        ("full", {"causal": "bottom_right", "softcap": 1.5}),
                                        ("alibi", {"causal": True})])
def test_bias_gradient_matches_finite_differences(key, params):
    q, k, v = qkv_host(8, batch=(1,), heads=2, kv_heads=1, length=4, key_length=5, dim=3, value_dim=2)
    bias = random.normal((1, 2, 4, 5), seed=(8, 3))
    d_out = random.normal((1, 2, 4, 2), seed=(8, 4))
    d_lse = random.normal((1, 2, 4), seed=(8, 5))
    grads = assert_vjp_matches_finite_differences(key, {"q": q, "k": k, "v": v, "bias": bias}, d_out, d_lse=d_lse,
                                                  params=params)
    assert grads["bias"].shape == bias.shape and numpy.abs(grads["bias"]).max() > 1e-3


def test_padded_gradients_match_finite_differences():
    q, k, v = qkv_host(9, batch=(2,), heads=2, kv_heads=1, length=4, key_length=5, dim=3, value_dim=2)
    bias = random.normal((2, 2, 4, 5), seed=(9, 3))
    d_out = random.normal((2, 2, 4, 2), seed=(9, 4))
    params = {"window": (1, 0), "alignment": "bottom_right", "seqlens_q": numpy.array([3, 4]),
              "seqlens_k": numpy.array([2, 4]), "key_leftpad": numpy.array([1, 0])}
    grads = assert_vjp_matches_finite_differences("sliding_window", {"q": q, "k": k, "v": v, "bias": bias}, d_out,
                                                  params=params)
    assert numpy.all(grads["q"][0, :, 3:] == 0) and numpy.all(grads["k"][0, :, 3:] == 0)


def test_a_custom_vjp_refuses_the_generic_options():
    q, k, v = qkv_host(10, length=8, key_length=8)
    with pytest.raises(NotImplementedError, match="generic softcap"):
        reflex.vjp("axial", {"q": q, "k": k, "v": v}, numpy.ones((2, 4, 8, 3)), shape=(8, 1), axis="rows",
                   softcap=2.0)


# --- padded batches -----------------------------------------------------------------------------

SEQLENS_Q = [6, 0, 3, 4, 1]
SEQLENS_K = [5, 4, 0, 3, 9]
LEFTPAD = [2, 0, 4, 6, 0]

PADDED = {
    "full": lambda f, **o: reflex.full_attention(*f, **o),
    "full_causal": lambda f, **o: reflex.full_attention(*f, causal="bottom_right", **o),
    "full_top_left": lambda f, **o: reflex.full_attention(*f, causal="top_left", **o),
    "sliding_window": lambda f, **o: reflex.sliding_window_attention(*f, window=(2, 1), alignment="bottom_right", **o),
    "sliding_window_top_left": lambda f, **o: reflex.sliding_window_attention(*f, window=(1, 0), **o),
    "sliding_window_gather": lambda f, **o: reflex.sliding_window_attention(*f, window=(2, 0), implementation="gather",
                                                                            alignment="bottom_right", **o),
    "dilated": lambda f, **o: reflex.dilated_attention(*f, window=(2, 1), dilation=2, alignment="bottom_right", **o),
    "dilated_gather": lambda f, **o: reflex.dilated_attention(*f, window=(1, 0), dilation=3, implementation="gather",
                                                              **o),
    "alibi": lambda f, **o: reflex.alibi_attention(*f, **o),
    "alibi_causal": lambda f, **o: reflex.alibi_attention(*f, causal=True, **o),
    "alibi_top_left": lambda f, **o: reflex.alibi_attention(*f, causal=True, alignment="top_left", symmetric=False, **o),
}


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
@pytest.mark.parametrize("name", sorted(PADDED))
def test_padded_batch_equals_a_loop_over_sequences(backend, name, implementation, small_tiles):
    """Padded rows give 0 and lse −inf; valid rows equal the mechanism on each sequence's valid slices,
    causal, windows and ALiBi distances aligned to those lengths (zero-length sequences included)."""
    run = PADDED[name]
    q, k, v = qkv_host(11, batch=(5,), length=6, key_length=9)
    extra = {} if name.endswith("gather") else {"implementation": implementation}
    lengths = {"seqlens_q": SEQLENS_Q, "seqlens_k": SEQLENS_K, "key_leftpad": LEFTPAD}
    out, lse = run([backend.asarray(a) for a in (q, k, v)], return_lse=True, **extra,
                   **{n: backend.asarray(numpy.array(x, dtype=numpy.int32)) for n, x in lengths.items()})
    out, lse = backend.to_numpy(out), backend.to_numpy(lse)
    for b, (sq, sk, lp) in enumerate(zip(SEQLENS_Q, SEQLENS_K, LEFTPAD)):
        ref_out, ref_lse = run((q[b:b + 1, :, :sq], k[b:b + 1, :, lp:lp + sk], v[b:b + 1, :, lp:lp + sk]),
                               return_lse=True, **extra)
        assert max_abs(out[b:b + 1, :, :sq], ref_out) <= 1e-15, (name, b)
        assert max_abs(lse[b:b + 1, :, :sq], ref_lse) <= 1e-15, (name, b)
        assert numpy.all(out[b, :, sq:] == 0) and numpy.all(lse[b, :, sq:] == -math.inf)


def test_seqlens_k_alone_and_seqlens_q_alone():
    q, k, v = qkv_host(12, batch=(2,), length=5, key_length=7)
    out = reflex.full_attention(q, k, v, causal="bottom_right", seqlens_k=numpy.array([7, 3]))
    ref = reflex.full_attention(q[1:], k[1:, :, :3], v[1:, :, :3], causal="bottom_right")
    assert max_abs(out[1:], ref) <= 1e-15
    out = reflex.sliding_window_attention(q, k, v, window=(1, 1), seqlens_q=numpy.array([2, 5]))
    ref = reflex.sliding_window_attention(q[:1, :, :2], k[:1], v[:1], window=(1, 1))
    assert max_abs(out[:1, :, :2], ref) <= 1e-15 and numpy.all(out[0, :, 2:] == 0)


def test_padding_is_refused_where_the_pattern_is_not_per_sequence():
    q, k, v = qkv_host(13, batch=(2,), length=8, key_length=8)
    with pytest.raises(NotImplementedError, match="block_local_attention does not align its pattern per sequence"):
        reflex.block_local_attention(q, k, v, block_size=2, seqlens_k=numpy.array([8, 3]))


@pytest.mark.parametrize("lengths,match", [
    ({"seqlens_q": numpy.array([1, 2, 3])}, r"seqlens_q must have shape \(B,\) = \(2,\)"),
    ({"seqlens_k": numpy.array([1, 10])}, r"seqlens_k must lie in \[0, 9\]"),
    ({"seqlens_q": numpy.array([-1, 2])}, r"seqlens_q must lie in \[0, 7\]"),
    ({"key_leftpad": numpy.array([4, 0]), "seqlens_k": numpy.array([6, 1])}, "key_leftpad \\+ seqlens_k must be at most"),
])
def test_bad_lengths_are_refused(lengths, match):
    q, k, v = qkv_host(14)
    with pytest.raises(ValueError, match=match):
        reflex.full_attention(q, k, v, **lengths)


def test_lengths_must_be_integers_with_one_batch_axis():
    q, k, v = qkv_host(15)
    with pytest.raises(TypeError, match="seqlens_q must be an integer array"):
        reflex.full_attention(q, k, v, seqlens_q=numpy.array([1.0, 2.0]))
    q, k, v = qkv_host(15, batch=(2, 1))
    with pytest.raises(ValueError, match="one batch axis"):
        reflex.full_attention(q, k, v, seqlens_q=numpy.array([1, 2]))
