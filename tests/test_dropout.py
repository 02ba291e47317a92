"""Dropout with an explicit keep mask in the engine: ``O = (P∘M)·V/(1 − p)``, lse undropped (flash-attn's reference).

Checks: an explicit host NumPy formula (≤ 1e-15), dense ≡ tiled ≡ gather (the mask read at the gathered
columns), gradients against central differences and torch float64 autograd of the explicit formula, the
lse unaffected, p = 0 ≡ no dropout, the backend matrix, edges and errors; sliding_window routes to the
engine when a dropout mask is given.
"""

from __future__ import annotations

import math

import numpy
import pytest

import reflex
from reflex import random
from reflex.mechanisms import _kernels
from tests.helpers import assert_vjp_matches_finite_differences, max_abs, qkv_host


def explicit(q, k, v, keep, p, *, mask=None, scale=None):
    """Host formula: P = softmax(scale·q·kᵀ masked), O = (P∘M)·V/(1 − p), lse of the undropped scores."""
    r = q.shape[-3] // k.shape[-3]
    k, v = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ numpy.swapaxes(k, -1, -2)
    if mask is not None:
        s = numpy.where(mask, s, -numpy.inf)
    m = numpy.max(s, axis=-1, keepdims=True)
    m = numpy.where(numpy.isfinite(m), m, 0.0)
    w = numpy.exp(s - m)
    total = w.sum(-1, keepdims=True)
    probs = w / numpy.where(total > 0, total, 1.0)
    out = (probs * keep) @ v / (1.0 - p)
    with numpy.errstate(divide="ignore"):
        lse = (m + numpy.log(total))[..., 0]
    return out, lse


def _keep(shape, seed, rate=0.3):
    return random.uniform(shape, seed=seed) >= rate


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_full_equals_the_explicit_formula_on_every_backend(backend, implementation):
    q, k, v = qkv_host(1, length=7, key_length=11)
    keep = _keep((2, 4, 7, 11), 5)
    mask = random.uniform((2, 1, 7, 11), seed=6) < 0.8
    mask[..., 2, :] = False  # a fully masked row: 0 and lse −∞ still
    out, lse = reflex.full_attention(*(backend.asarray(a) for a in (q, k, v)), mask=backend.asarray(mask),
                                     dropout_mask=backend.asarray(keep), dropout_p=0.3, return_lse=True,
                                     implementation=implementation)
    ref_out, ref_lse = explicit(q, k, v, keep, 0.3, mask=mask)
    assert max_abs(backend.to_numpy(out), ref_out) <= 1e-15
    assert max_abs(backend.to_numpy(lse), ref_lse) <= 1e-15
    undropped = reflex.full_attention(*(backend.asarray(a) for a in (q, k, v)), mask=backend.asarray(mask),
                                      return_lse=True, implementation=implementation)
    assert max_abs(backend.to_numpy(lse), backend.to_numpy(undropped[1])) == 0.0  # the lse does not see the mask


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_dense_tiled_and_gather_agree(causal):
    q, k, v = qkv_host(2, length=13, key_length=17, dim=4, value_dim=3)
    p = _kernels.prepare(q, k, v)
    keep = _keep((2, 4, 13, 17), 7, rate=0.5)
    dropout = _kernels.Dropout(keep, 0.5)
    masks = []
    if causal:
        offset = 0 if causal == "top_left" else 17 - 13
        masks = [lambda rows, cols: cols <= rows + offset]
    dense = _kernels.dense(p, scale=0.4, mask=masks, dropout=dropout)
    for bq, bk in [(1, 1), (4, 5), (13, 17)]:
        tiled = _kernels.tiled(p, scale=0.4, mask=masks, dropout=dropout, block_q=bq, block_k=bk)
        assert max_abs(tiled[0], dense[0]) <= 1e-15 and max_abs(tiled[1], dense[1]) <= 1e-15
    idx = numpy.broadcast_to(numpy.arange(17), (13, 17)).copy()
    idx[:, 16] = -1  # padding: key 16 listed nowhere, so masked in the dense comparison below
    dense_pad = _kernels.dense(p, scale=0.4, mask=[*masks, numpy.arange(17) < 16], dropout=dropout)
    for drop in (dropout, _kernels.Dropout(lambda rows, cols: numpy.broadcast_to(keep, (2, 4, 13, 17))[
            :, :, int(rows[0, 0]):int(rows[-1, 0]) + 1][
            numpy.arange(2)[:, None, None, None], numpy.arange(4)[None, :, None, None],
            numpy.arange(rows.shape[0])[None, None, :, None], numpy.where(cols >= 0, cols, 0)], 0.5)):
        gathered = _kernels.gather(p, idx, scale=0.4, mask=[m for m in masks], dropout=drop, block_q=5)
        assert max_abs(gathered[0], dense_pad[0]) <= 1e-15 and max_abs(gathered[1], dense_pad[1]) <= 1e-15


def test_gather_reads_the_mask_at_the_gathered_columns():
    q, k, v = qkv_host(3, length=5, key_length=8)
    p = _kernels.prepare(q, k, v)
    keep = _keep((2, 4, 5, 8), 8, rate=0.4)
    idx = numpy.array([[7, 2, 5], [0, 0, 3], [6, -1, 1], [4, 4, 4], [1, 3, 7]])
    out, lse = _kernels.gather(p, idx, scale=0.5, dropout=_kernels.Dropout(keep, 0.4))
    # host formula over the listed keys (duplicates counted, kept or dropped alike)
    kr, vr = numpy.repeat(k, 2, axis=-3), numpy.repeat(v, 2, axis=-3)
    for i in range(5):
        cols = idx[i][idx[i] >= 0]
        s = 0.5 * numpy.einsum("bhd,bhkd->bhk", q[:, :, i], kr[:, :, cols])
        w = numpy.exp(s - s.max(-1, keepdims=True))
        probs = w / w.sum(-1, keepdims=True)
        ref = numpy.einsum("bhk,bhke->bhe", probs * keep[:, :, i, cols], vr[:, :, cols]) / 0.6
        assert max_abs(out[:, :, i], ref) <= 1e-15
        assert max_abs(lse[:, :, i], numpy.log(numpy.exp(s).sum(-1))) <= 1e-14


def test_rate_zero_is_no_dropout_and_the_mask_is_ignored():
    q, k, v = qkv_host(4)
    keep = _keep((2, 4, 7, 9), 9)
    base = reflex.full_attention(q, k, v, return_lse=True)
    for implementation in ("dense", "tiled"):
        got = reflex.full_attention(q, k, v, dropout_mask=keep, dropout_p=0.0, return_lse=True,
                                    implementation=implementation)
        assert numpy.array_equal(got[0], base[0]) and numpy.array_equal(got[1], base[1])
    all_kept = reflex.full_attention(q, k, v, dropout_mask=numpy.ones((1,), dtype=bool), dropout_p=0.5)
    assert max_abs(all_kept, 2.0 * base[0]) <= 1e-15


def test_broadcast_masks_edges_and_same_bits():
    q, k, v = qkv_host(5, length=1, key_length=1)
    keep = numpy.zeros((1, 1), dtype=bool)
    out, lse = reflex.full_attention(q, k, v, dropout_mask=keep, dropout_p=0.2, return_lse=True)
    assert numpy.all(out == 0.0) and numpy.all(numpy.isfinite(lse))  # every key dropped: 0, lse kept
    q, k, v = qkv_host(6, length=0, key_length=4)
    assert reflex.full_attention(q, k, v, dropout_mask=numpy.ones((1, 4), dtype=bool), dropout_p=0.2).shape == (2, 4, 0, 3)
    q, k, v = qkv_host(7, length=6, key_length=4)
    keep = _keep((4,), 10)  # a per-key mask, broadcast over rows and heads
    first = reflex.full_attention(q, k, v, dropout_mask=keep, dropout_p=0.25, causal="bottom_right")
    again = reflex.full_attention(q, k, v, dropout_mask=keep, dropout_p=0.25, causal="bottom_right")
    assert numpy.array_equal(first, again)
    ref, _ = explicit(q, k, v, numpy.broadcast_to(keep, (2, 4, 6, 4)), 0.25,
                      mask=numpy.arange(4)[None, :] <= numpy.arange(6)[:, None] - 2)
    assert max_abs(first, ref) <= 1e-15


def test_errors_name_the_argument():
    q, k, v = qkv_host(8)
    keep = _keep((2, 4, 7, 9), 11)
    with pytest.raises(ValueError, match="dropout_p"):
        reflex.full_attention(q, k, v, dropout_mask=keep, dropout_p=1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        reflex.full_attention(q, k, v, dropout_mask=keep, dropout_p=-0.1)
    with pytest.raises(ValueError, match="dropout_mask"):
        reflex.full_attention(q, k, v, dropout_p=0.1)
    with pytest.raises((TypeError, ValueError), match="dropout_mask"):
        reflex.full_attention(q, k, v, dropout_mask=numpy.ones((2, 4, 7, 9)), dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_mask"):
        reflex.full_attention(q, k, v, dropout_mask=numpy.ones((3, 9), dtype=bool), dropout_p=0.1)


# --- gradients ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_full_vjp_matches_central_differences(implementation):
    q, k, v = qkv_host(9, length=5, key_length=6, dim=3, value_dim=2)
    keep = _keep((2, 4, 5, 6), 12, rate=0.4)
    inputs = {"q": q, "k": k, "v": v, "dropout_mask": keep, "bias": random.normal((4, 5, 6), seed=13)}
    rng = numpy.random.default_rng(0)
    assert_vjp_matches_finite_differences("full", inputs, rng.normal(size=(2, 4, 5, 2)),
                                          d_lse=rng.normal(size=(2, 4, 5)),
                                          params={"dropout_p": 0.4, "causal": "bottom_right",
                                                  "implementation": implementation}, max_entries=40)


def test_kernel_backwards_agree_and_match_torch_autograd():
    torch = pytest.importorskip("torch")
    q, k, v = qkv_host(10, length=6, key_length=8, dim=3, value_dim=4)
    keep = _keep((2, 4, 6, 8), 14, rate=0.3)
    bias = random.normal((2, 4, 6, 8), seed=15)
    rng = numpy.random.default_rng(1)
    d_out, d_lse = rng.normal(size=(2, 4, 6, 4)), rng.normal(size=(2, 4, 6))
    grads = reflex.vjp("full", {"q": q, "k": k, "v": v, "bias": bias, "dropout_mask": keep}, d_out, d_lse=d_lse,
                       dropout_p=0.3, implementation="dense")
    qt, kt, vt, bt = (torch.tensor(a, requires_grad=True) for a in (q, k, v, bias))
    s = qt @ torch.repeat_interleave(kt, 2, dim=-3).transpose(-1, -2) / math.sqrt(3) + bt
    probs = torch.softmax(s, dim=-1)
    out = (probs * torch.from_numpy(keep)) @ torch.repeat_interleave(vt, 2, dim=-3) / (1 - 0.3)
    lse = torch.logsumexp(s, dim=-1)
    ((out * torch.from_numpy(d_out)).sum() + (lse * torch.from_numpy(d_lse)).sum()).backward()
    for name, t in (("q", qt), ("k", kt), ("v", vt), ("bias", bt)):
        assert max_abs(grads[name], t.grad.numpy()) <= 1e-14, name
    # dense ≡ tiled ≡ gather backward at the kernels
    p = _kernels.prepare(q, k, v)
    dropout = _kernels.Dropout(keep, 0.3)
    o, lse_ = _kernels.dense(p, scale=1 / math.sqrt(3), bias=bias, dropout=dropout)
    ref = _kernels.dense_backward(p, o, lse_, d_out, d_lse, scale=1 / math.sqrt(3), bias=bias, dropout=dropout)
    tiled = _kernels.tiled_backward(p, o, lse_, d_out, d_lse, scale=1 / math.sqrt(3), bias=bias, dropout=dropout,
                                    block_q=4, block_k=3)
    idx = numpy.broadcast_to(numpy.arange(8), (6, 8))
    bias_term = lambda rows, cols: numpy.take_along_axis(bias[:, :, int(rows[0, 0]):int(rows[-1, 0]) + 1], cols, -1)  # noqa: E731
    og, lg = _kernels.gather(p, idx, scale=1 / math.sqrt(3), bias=bias_term, dropout=dropout, block_q=4)
    assert max_abs(og, o) <= 1e-15 and max_abs(lg, lse_) <= 1e-15
    gathered = _kernels.gather_backward(p, idx, og, lg, d_out, d_lse, scale=1 / math.sqrt(3), bias=bias_term,
                                        dropout=dropout, block_q=4)
    for other in (tiled, gathered):
        for a, b in ((other.dq, ref.dq), (other.dk, ref.dk), (other.dv, ref.dv)):
            assert max_abs(a, b) <= 1e-14
    assert max_abs(ref.dq, qt.grad.numpy()) <= 1e-14 and max_abs(ref.dv, vt.grad.numpy()) <= 1e-14


def test_vjp_on_the_backend_matrix_equals_numpy(backend):
    q, k, v = qkv_host(11, length=4, key_length=5)
    keep = _keep((2, 4, 4, 5), 16)
    rng = numpy.random.default_rng(2)
    d_out = rng.normal(size=(2, 4, 4, 3))
    host = reflex.vjp("full", {"q": q, "k": k, "v": v, "dropout_mask": keep}, d_out, dropout_p=0.3)
    got = reflex.vjp("full", {"q": backend.asarray(q), "k": backend.asarray(k), "v": backend.asarray(v),
                              "dropout_mask": backend.asarray(keep)}, backend.asarray(d_out), dropout_p=0.3)
    for name in ("q", "k", "v"):  # another BLAS sums dK, dV in another order: a few ulp
        assert max_abs(backend.to_numpy(got[name]), host[name]) <= 1e-14


# --- sliding_window -----------------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled", "gather"])
def test_sliding_window_dropout_routes_to_the_engine(implementation):
    q, k, v = qkv_host(12, length=9, key_length=9)
    keep = _keep((2, 4, 9, 9), 17)
    out, lse = reflex.sliding_window_attention(q, k, v, window=(2, 1), dropout_mask=keep, dropout_p=0.3,
                                               return_lse=True, implementation=implementation)
    rel = numpy.arange(9)[None, :] - numpy.arange(9)[:, None]
    ref_out, ref_lse = explicit(q, k, v, keep, 0.3, mask=(rel >= -2) & (rel <= 1))
    assert max_abs(out, ref_out) <= 1e-15 and max_abs(lse, ref_lse) <= 1e-15
    with pytest.raises(ValueError, match="dropout"):
        reflex.sliding_window_attention(q, k, v, window=(2, 1), dropout_mask=keep, dropout_p=0.3,
                                        implementation="numpy")


def test_sliding_window_dropout_vjp_matches_central_differences():
    q, k, v = qkv_host(13, length=5, key_length=5, dim=3, value_dim=2)
    keep = _keep((2, 4, 5, 5), 18, rate=0.4)
    rng = numpy.random.default_rng(3)
    assert_vjp_matches_finite_differences("sliding_window", {"q": q, "k": k, "v": v, "dropout_mask": keep},
                                          rng.normal(size=(2, 4, 5, 2)), d_lse=rng.normal(size=(2, 4, 5)),
                                          params={"window": (1, 1), "dropout_p": 0.4}, max_entries=40)


# --- every engine mechanism (the option layer's extra terms) -------------------------------------------

def _generic_dropout_keys():
    return sorted(m.key for m in reflex.list_mechanisms()
                  if "dropout_mask" in getattr(m.function, "generic_terms", ()))


def _plain_case(m):
    return next((c for c in m.cases("tiny", 0) if "sinks" not in c.inputs and c.params.get("layout") != "blhd"), None)


def _split(m, case):
    import inspect

    positional = [n for n, prm in inspect.signature(m.function).parameters.items()
                  if prm.kind is inspect.Parameter.POSITIONAL_ONLY and n in case.inputs]
    return [case.inputs[n] for n in positional], {n: x for n, x in case.inputs.items() if n not in positional}


def test_the_option_layer_declares_dropout():
    keys = _generic_dropout_keys()
    assert {"alibi", "topk", "bigbird", "t5_bias"} <= set(keys)
    assert "full" not in keys and "sliding_window" not in keys  # they declare dropout_mask/dropout_p themselves


@pytest.mark.parametrize("key", _generic_dropout_keys())
def test_every_engine_mechanism_applies_the_keep_mask_to_its_engine_call(key):
    m = reflex.get(key)
    case = _plain_case(m)
    if case is None:
        pytest.skip("no case without sinks")
    args, inputs = _split(m, case)
    with _kernels.recording() as calls:
        plain = m.function(*args, **inputs, **case.params, return_lse=True)
    engine = [c for c in calls if c.p is not None]
    keep = _keep(tuple(engine[0].p.score_shape) if engine else (1,), 19)
    try:
        with _kernels.recording() as calls:
            out, lse = m.function(*args, **inputs, **case.params, dropout_mask=keep, dropout_p=0.3, return_lse=True)
    except NotImplementedError as err:  # refused, as mask/bias are: another grid or several passes
        assert "dropout_mask" in str(err) and "dropout_p" in str(err)
        return
    engine_d = [c for c in calls if c.p is not None]
    assert len(engine_d) == 1 and engine_d[0].options["dropout"].rate == 0.3
    call = engine_d[0]
    options = {n: x for n, x in call.options.items() if n != "dropout"}
    dropout = _kernels.Dropout(keep, 0.3)
    if call.kernel == "gather":
        ref = _kernels.gather(call.p, call.indices, **options, dropout=dropout)
        undropped = _kernels.gather(call.p, call.indices, **options)
    else:
        ref = getattr(_kernels, call.kernel)(call.p, **options, dropout=dropout)
        undropped = getattr(_kernels, call.kernel)(call.p, **options)
    assert max_abs(call.out, ref[0]) == 0.0 and max_abs(call.lse, undropped[1]) == 0.0  # lse undropped
    assert max_abs(call.out, undropped[0]) > 0.0
    if engine and plain[0] is engine[0].out:  # the mechanism returns its engine call's result
        assert max_abs(out, ref[0]) == 0.0 and max_abs(lse, plain[1]) == 0.0
        assert max_abs(out, plain[0]) > 0.0


@pytest.mark.parametrize("key", ["alibi", "topk"])
def test_generic_dropout_vjp_matches_central_differences(key):
    m = reflex.get(key)
    case = _plain_case(m)
    args, inputs = _split(m, case)
    out, lse = m.function(*args, **inputs, **case.params, return_lse=True)
    keep = _keep(tuple(numpy.shape(out))[:-1] + (int(numpy.shape(case.inputs["k"])[-2]),), 20, rate=0.4)
    rng = numpy.random.default_rng(4)
    assert_vjp_matches_finite_differences(key, {**case.inputs, "dropout_mask": keep}, rng.normal(size=numpy.shape(out)),
                                          d_lse=rng.normal(size=numpy.shape(lse)),
                                          params={**case.params, "dropout_p": 0.4}, max_entries=30)


@pytest.mark.parametrize("implementation", ["dense", "tiled", "gather"])
def test_dropout_under_the_engine_window_equals_the_rows_of_the_full_run(implementation):
    from reflex.mechanisms._engine.window import window
    from reflex.mechanisms._merge import merge_partials

    q, k, v = qkv_host(14, length=9, key_length=9)
    keep = _keep((2, 4, 9, 9), 21)
    run = dict(window=(3, 1), dropout_mask=keep, dropout_p=0.3, return_lse=True, implementation=implementation)
    whole = reflex.sliding_window_attention(q, k, v, **run)
    parts = []
    for keys in ((0, 4), (4, 9)):
        with window(rows=(2, 7), keys=keys):
            parts.append(reflex.sliding_window_attention(q, k, v, **run))
    out, lse = merge_partials(numpy, [o for o, _ in parts], [l_ for _, l_ in parts])
    assert max_abs(out, whole[0][..., 2:7, :]) <= 1e-15 and max_abs(lse, whole[1][..., 2:7]) <= 1e-15
