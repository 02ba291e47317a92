"""The engine's backward: dense, tiled and gather VJPs, the shared mechanism VJP, differentiable terms.

Checks: central differences for every mechanism registered with the shared engine VJP; dense ≡ tiled ≡
gather; torch autograd in float64 (SDPA, an explicit softcap formula, FlexAttention eager) as an
independent path; GQA and key-permutation properties; fully masked rows and non-finite masked keys.
"""

from __future__ import annotations

import math

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from reflex.mechanisms import _kernels
from reflex.mechanisms._engine.record import engine_vjp
from reflex.mechanisms.full import full_attention
from tests.helpers import assert_vjp_matches_finite_differences, max_abs, qkv_host


# Engine mechanisms with a short VJP of their own over recorded engine calls (several calls merged).
RECORDED_VJPS = {"longformer", "axial", "bp_tree", "hierarchical", "compressive", "routed_mixture", "task_prior",
                 "lsh"}


def _engine_vjp_keys() -> list[str]:
    return [m.key for m in reflex.list_mechanisms() if m.vjp is not None
            and ("engine_vjp" in (m.vjp.__qualname__ or "") or m.key in RECORDED_VJPS)]


def _cotangents(out, lse, seed=1):
    rng = numpy.random.default_rng(seed)
    return rng.normal(size=numpy.shape(out)), (None if lse is None else rng.normal(size=numpy.shape(lse)))


# Cases where a central difference crosses a selection boundary (ties of top-k scores): the
# subgradient is the branch's (0 across the tie) and differences are not defined there.
FD_SKIP = {("topk", "ties")}


def _fd_cases():
    for key in _engine_vjp_keys():
        for case in reflex.get(key).cases("tiny", 0):
            if (key, case.variant) not in FD_SKIP:
                yield pytest.param(key, case.variant, id=f"{key}-{case.variant}")


@pytest.mark.parametrize("key,variant", list(_fd_cases()))
def test_engine_vjp_matches_central_differences(key, variant):
    m = reflex.get(key)
    case = next(c for c in m.cases("tiny", 0) if c.variant == variant)
    result = case.call(m, return_lse=True) if m.returns_lse else case.call(m)
    out, lse = result if m.returns_lse else (result, None)
    d_out, d_lse = _cotangents(out, lse)
    assert_vjp_matches_finite_differences(key, dict(case.inputs), d_out, d_lse=d_lse, params=dict(case.params),
                                          max_entries=30)


def test_the_shared_vjp_covers_the_engine_mechanisms():
    covered = set(_engine_vjp_keys())
    expected = {"full", "sliding_window", "dilated", "global", "random", "block_local", "strided", "bigbird", "star",
                "sparse_pattern", "e2lsh", "routing", "topk", "block_topk", "indexer_topk", "adaptive",
                "recurrent_memory", "longformer", "axial", "bp_tree", "hierarchical",
                "compressive", "routed_mixture", "task_prior", "gaussian_prior", "gaussian_transformer", "lsh"}
    assert expected <= covered


# --- dense ≡ tiled ≡ gather, and the backend matrix ---------------------------------------------

def _full_inputs(seed=3):
    q, k, v = qkv_host(seed, batch=(2,), heads=4, kv_heads=2, length=7, key_length=9, dim=5, value_dim=3)
    rng = numpy.random.default_rng(seed)
    mask = rng.uniform(size=(2, 4, 7, 9)) < 0.7
    mask[..., 0, :] = False  # a fully masked row
    bias = rng.normal(size=(4, 1, 9))
    return dict(q=q, k=k, v=v, mask=mask, bias=bias)


@pytest.mark.parametrize("params", [{}, {"softcap": 1.3, "scale": 0.8}, {"causal": "bottom_right"},
                                    {"causal": True, "softcap": 2.0}])
def test_dense_tiled_backward_agree(backend, params, small_tiles):
    inputs = _full_inputs()
    out, lse = full_attention(inputs["q"], inputs["k"], inputs["v"], mask=inputs["mask"], bias=inputs["bias"],
                              return_lse=True, **params)
    d_out, d_lse = _cotangents(out, lse)
    moved = {n: backend.asarray(x) for n, x in inputs.items()}
    grads = {}
    for implementation in ("dense", "tiled"):
        g = reflex.vjp("full", moved, backend.asarray(d_out), d_lse=backend.asarray(d_lse),
                       implementation=implementation, **params)
        assert set(g) == {"q", "k", "v", "bias"}
        grads[implementation] = {n: backend.to_numpy(x) for n, x in g.items()}
    for name in ("q", "k", "v", "bias"):
        assert grads["dense"][name].shape == inputs[name].shape
        assert max_abs(grads["dense"][name], grads["tiled"][name]) <= 1e-13
    if backend.name != "numpy":
        ref = reflex.vjp("full", inputs, d_out, d_lse=d_lse, implementation="dense", **params)
        for name in ref:
            assert max_abs(grads["dense"][name], ref[name]) <= 1e-13


def test_gather_backward_agrees_with_dense(backend):
    """random with explicit key lists (each key read by many rows and GQA heads): gather ≡ dense backward."""
    q, k, v = qkv_host(5, batch=(2,), heads=4, kv_heads=2, length=6, key_length=5, dim=4, value_dim=3)
    rng = numpy.random.default_rng(5)
    indices = numpy.argsort(rng.uniform(size=(2, 4, 6, 5)), axis=-1)[..., :3]
    inputs = {"q": q, "k": k, "v": v, "indices": indices}
    out, lse = reflex.get("random").function(q, k, v, indices=indices, return_lse=True)
    d_out, d_lse = _cotangents(out, lse)
    moved = {n: backend.asarray(x) for n, x in inputs.items()}
    g_gather = reflex.vjp("random", moved, backend.asarray(d_out), d_lse=backend.asarray(d_lse),
                          implementation="gather")
    g_dense = reflex.vjp("random", moved, backend.asarray(d_out), d_lse=backend.asarray(d_lse),
                         implementation="dense")
    assert set(g_gather) == {"q", "k", "v"}
    for name in g_gather:
        a, b = backend.to_numpy(g_gather[name]), backend.to_numpy(g_dense[name])
        assert max_abs(a, b) <= 1e-13
    again = reflex.vjp("random", moved, backend.asarray(d_out), d_lse=backend.asarray(d_lse), implementation="gather")
    for name in g_gather:  # deterministic scatter-add: same bits
        assert numpy.array_equal(backend.to_numpy(again[name]), backend.to_numpy(g_gather[name]))


def test_gather_kernel_backward_with_padding_and_softcap():
    """Kernel level: -1 padding, a row with no key, duplicates, softcap and the lse cotangent; the dense
    kernel with the multiplicity as a log bias is the reference."""
    q, k, v = qkv_host(6, batch=(2,), heads=4, kv_heads=2, length=5, key_length=6, dim=3, value_dim=2)
    rng = numpy.random.default_rng(6)
    indices = rng.integers(-1, 6, size=(2, 4, 5, 4))
    indices[..., 0, :] = -1
    counts = numpy.zeros((2, 4, 5, 6))
    for b, h, i, t in numpy.ndindex(indices.shape):
        if indices[b, h, i, t] >= 0:
            counts[b, h, i, indices[b, h, i, t]] += 1
    with numpy.errstate(divide="ignore"):
        log_counts = numpy.log(counts)
    p = _kernels.prepare(q, k, v)
    d_out, d_lse = _cotangents(numpy.zeros((2, 4, 5, 2)), numpy.zeros((2, 4, 5)))
    out, lse = _kernels.dense(p, scale=0.7, bias=log_counts, softcap=1.5)
    ref = _kernels.dense_backward(p, out, lse, d_out, d_lse, scale=0.7, bias=log_counts, softcap=1.5)
    out_g, lse_g = _kernels.gather(p, indices, scale=0.7, softcap=1.5, block_q=2)
    got = _kernels.gather_backward(p, indices, out_g, lse_g, d_out, d_lse, scale=0.7, softcap=1.5, block_q=2)
    for a, b in ((got.dq, ref.dq), (got.dk, ref.dk), (got.dv, ref.dv)):
        assert max_abs(a, b) <= 1e-13
    assert numpy.all(got.dq[..., 0, :] == 0)


def test_band_mechanisms_backward_on_every_kernel(small_tiles):
    q, k, v = qkv_host(7, batch=(1,), heads=2, kv_heads=1, length=10, key_length=12, dim=3, value_dim=2)
    inputs = {"q": q, "k": k, "v": v}
    out = reflex.get("sliding_window").function(q, k, v, window=(2, 1), alignment="bottom_right")
    d_out, _ = _cotangents(out, None)
    ref = reflex.vjp("sliding_window", inputs, d_out, window=(2, 1), alignment="bottom_right", implementation="dense")
    for implementation in ("auto", "tiled", "gather", "numpy", "numba"):
        got = reflex.vjp("sliding_window", inputs, d_out, window=(2, 1), alignment="bottom_right",
                         implementation=implementation)
        for name in ref:
            assert max_abs(got[name], ref[name]) <= 1e-13, (implementation, name)


# --- edges: fully masked rows, empty, non-finite masked keys -------------------------------------

def test_fully_masked_rows_get_zero_gradients_never_nan():
    inputs = _full_inputs()
    inputs["mask"][...] = False
    inputs["mask"][0, 1, 3, 2] = True  # one live row, attending one key
    d_out, d_lse = _cotangents(numpy.zeros((2, 4, 7, 3)), numpy.zeros((2, 4, 7)))
    for implementation in ("dense", "tiled"):
        g = reflex.vjp("full", inputs, d_out, d_lse=d_lse, implementation=implementation)
        for name, x in g.items():
            assert numpy.all(numpy.isfinite(x)), name
        live = numpy.zeros((2, 4, 7), dtype=bool)
        live[0, 1, 3] = True
        assert numpy.all(g["q"][~live] == 0)
        assert numpy.count_nonzero(g["bias"]) == 1 and abs(g["bias"][1, 0, 2] - d_lse[0, 1, 3]) <= 1e-15
        # the live row: P = 1, so dZ = dL (lse = its one score) and dq = τ·dL·k
        expected = d_lse[0, 1, 3] * inputs["k"][0, 0, 2] / math.sqrt(5)
        assert max_abs(g["q"][0, 1, 3], expected) <= 1e-15
        dv_rows = numpy.abs(g["v"]).sum(-1)
        assert dv_rows[0, 0, 2] > 0 and numpy.count_nonzero(dv_rows) == 1


@pytest.mark.parametrize("length,key_length", [(0, 4), (3, 0), (1, 1)])
def test_empty_and_single(length, key_length):
    q, k, v = qkv_host(2, batch=(), heads=2, kv_heads=1, length=length, key_length=key_length, dim=3, value_dim=2)
    out, lse = full_attention(q, k, v, return_lse=True)
    d_out, d_lse = _cotangents(out, lse)
    for implementation in ("dense", "tiled"):
        g = reflex.vjp("full", {"q": q, "k": k, "v": v}, d_out, d_lse=d_lse, implementation=implementation)
        assert all(numpy.all(numpy.isfinite(x)) for x in g.values())
        assert g["q"].shape == q.shape and g["k"].shape == k.shape and g["v"].shape == v.shape


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_nonfinite_masked_keys_inert_in_backward(implementation, small_tiles):
    inputs = _full_inputs()
    inputs["mask"][..., [2, 5]] = False
    poisoned = dict(inputs)
    poisoned["v"] = inputs["v"].copy()
    poisoned["v"][..., [2, 5], :] = math.nan
    poisoned["k"] = inputs["k"].copy()
    poisoned["k"][..., 5, 0] = math.inf
    out, lse = full_attention(inputs["q"], inputs["k"], inputs["v"], mask=inputs["mask"], return_lse=True)
    d_out, d_lse = _cotangents(out, lse)
    ref = reflex.vjp("full", {n: inputs[n] for n in ("q", "k", "v", "mask")}, d_out, d_lse=d_lse,
                     implementation=implementation)
    got = reflex.vjp("full", {n: poisoned[n] for n in ("q", "k", "v", "mask")}, d_out, d_lse=d_lse,
                     implementation=implementation)
    for name in ref:
        assert numpy.all(numpy.isfinite(got[name])), name
        assert max_abs(got[name], ref[name]) <= 1e-13
    # a key that IS attended and holds NaN: the rows attending it and the keys they weigh get NaN
    attended = dict(poisoned)
    attended["v"] = inputs["v"].copy()
    attended["v"][0, 0, 1, 0] = math.nan
    got = reflex.vjp("full", {n: attended[n] for n in ("q", "k", "v", "mask")}, d_out, d_lse=d_lse,
                     implementation=implementation)
    hit = inputs["mask"][0, 0:2, :, 1]  # query heads 0, 1 read kv head 0
    assert numpy.all(numpy.isnan(got["q"][0, 0:2][hit]))
    assert numpy.all(numpy.isfinite(got["q"][0, 0:2][~hit])) and numpy.all(numpy.isfinite(got["q"][1]))
    assert numpy.isnan(got["v"][0, 0, 1]).all() and numpy.all(numpy.isfinite(got["v"][1]))


# --- torch autograd in float64: independent anchors ----------------------------------------------

def _torch_loss(torch, out, lse, d_out, d_lse):
    total = (out * torch.from_numpy(d_out)).sum()
    if d_lse is not None:
        total = total + (torch.where(torch.isfinite(lse), lse, 0.0) * torch.from_numpy(d_lse)).sum()
    return total


@pytest.mark.parametrize("variant", ["mask_bias", "gqa", "top_left", "bottom_right", "softcap"])
def test_full_matches_torch_autograd(variant):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    inputs = _full_inputs(11)
    inputs["mask"][..., 0, :] = True  # SDPA returns NaN on fully masked rows: keep every row live here
    q, k, v = (torch.tensor(inputs[n], requires_grad=True) for n in ("q", "k", "v"))
    group = q.shape[-3] // k.shape[-3]
    kr, vr = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    params: dict = {}
    used = {n: inputs[n] for n in ("q", "k", "v")}
    bias_t = None
    if variant == "mask_bias":
        bias_t = torch.tensor(inputs["bias"], requires_grad=True)
        attn = torch.where(torch.from_numpy(inputs["mask"]), bias_t, -math.inf)
        out_t = F.scaled_dot_product_attention(q, kr, vr, attn_mask=attn)
        used.update(mask=inputs["mask"], bias=inputs["bias"])
    elif variant == "gqa":
        out_t = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    elif variant == "top_left":
        out_t = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        params["causal"] = "top_left"
    elif variant == "bottom_right":
        L, S = q.shape[-2], k.shape[-2]
        allowed = torch.arange(S)[None, :] <= torch.arange(L)[:, None] + (S - L)
        out_t = F.scaled_dot_product_attention(q, kr, vr, attn_mask=allowed)
        params["causal"] = "bottom_right"
    else:  # softcap: an explicit torch formula, c·tanh(s/c) on the scaled scores
        c, scale = 1.7, 0.9
        s = c * torch.tanh(scale * q @ kr.transpose(-1, -2) / c)
        out_t = torch.softmax(s, dim=-1) @ vr
        params.update(softcap=c, scale=scale)
    if variant == "softcap":
        lse_t = torch.logsumexp(s, dim=-1)
    else:
        scores = q @ kr.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if variant == "mask_bias":
            scores = scores + attn
        elif variant in ("top_left", "bottom_right"):
            L, S = q.shape[-2], k.shape[-2]
            shift = 0 if variant == "top_left" else S - L
            scores = torch.where(torch.arange(S)[None, :] <= torch.arange(L)[:, None] + shift, scores, -math.inf)
        lse_t = torch.logsumexp(scores, dim=-1)
    d_out, d_lse = _cotangents(out_t.detach().numpy(), lse_t.detach().numpy(), seed=2)
    _torch_loss(torch, out_t, lse_t, d_out, d_lse).backward()
    expected = {"q": q.grad, "k": k.grad, "v": v.grad}
    if bias_t is not None:
        expected["bias"] = bias_t.grad
    for implementation in ("dense", "tiled"):
        got = reflex.vjp("full", used, d_out, d_lse=d_lse, implementation=implementation, **params)
        for name, g in expected.items():
            assert max_abs(got[name], g.numpy()) <= 1e-12, (variant, implementation, name)


def test_sliding_window_matches_flex_attention_and_torch_autograd():
    """FlexAttention eager gives the forward (its CPU build has no backward); the gradients come from
    torch autograd through SDPA under FlexAttention's own dense mask of the same ``mask_mod``."""
    torch = pytest.importorskip("torch")
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    import torch.nn.functional as F

    q_np, k_np, v_np = qkv_host(13, batch=(1,), heads=2, kv_heads=2, length=16, key_length=16, dim=4, value_dim=4)
    left, right = 3, 1

    def mask_mod(b, h, i, j):
        return (j >= i - left) & (j <= i + right)

    out = reflex.get("sliding_window").function(q_np, k_np, v_np, window=(left, right))
    with torch.no_grad():
        try:
            block = flex.create_block_mask(mask_mod, None, None, 16, 16, device="cpu", BLOCK_SIZE=16)
            flex_out = flex.flex_attention(*(torch.from_numpy(x) for x in (q_np, k_np, v_np)), block_mask=block)
        except Exception as error:  # not every torch build runs FlexAttention eagerly on a CPU
            pytest.skip(f"flex_attention does not run eagerly on this CPU: {error}")
    assert max_abs(out, flex_out.numpy()) <= 1e-12
    dense_mask = flex.create_mask(mask_mod, None, None, 16, 16, device="cpu")
    q, k, v = (torch.tensor(x, requires_grad=True) for x in (q_np, k_np, v_np))
    out_t = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)
    d_out, _ = _cotangents(out, None, seed=4)
    (out_t * torch.from_numpy(d_out)).sum().backward()
    for implementation in ("dense", "tiled", "gather", "numpy"):
        got = reflex.vjp("sliding_window", {"q": q_np, "k": k_np, "v": v_np}, d_out, window=(left, right),
                         implementation=implementation)
        for name, t in (("q", q), ("k", k), ("v", v)):
            assert max_abs(got[name], t.grad.numpy()) <= 1e-12, (implementation, name)


# --- properties ------------------------------------------------------------------------------------

@given(seed=st.integers(0, 2 ** 16), group=st.sampled_from([1, 2, 3]), causal=st.booleans())
def test_gqa_equals_repeated_kv_with_gradients_summed(seed, group, causal):
    q, k, v = qkv_host(seed, batch=(1,), heads=2 * group, kv_heads=2, length=4, key_length=5, dim=3, value_dim=2)
    out = full_attention(q, k, v, causal=causal)
    d_out, _ = _cotangents(out, None, seed=seed)
    g = reflex.vjp("full", {"q": q, "k": k, "v": v}, d_out, causal=causal)
    kr, vr = numpy.repeat(k, group, axis=-3), numpy.repeat(v, group, axis=-3)
    r = reflex.vjp("full", {"q": q, "k": kr, "v": vr}, d_out, causal=causal)
    assert max_abs(g["q"], r["q"]) <= 1e-13
    for name in ("k", "v"):
        summed = r[name].reshape(*r[name].shape[:-3], 2, group, *r[name].shape[-2:]).sum(-3)
        assert max_abs(g[name], summed) <= 1e-13


@given(seed=st.integers(0, 2 ** 16), implementation=st.sampled_from(["dense", "tiled"]))
def test_key_permutation_permutes_dk_dv(seed, implementation):
    q, k, v = qkv_host(seed, batch=(1,), heads=2, kv_heads=1, length=4, key_length=6, dim=3, value_dim=2)
    bias = numpy.random.default_rng(seed).normal(size=(2, 4, 6))
    perm = numpy.random.default_rng(seed + 1).permutation(6)
    out = full_attention(q, k, v, bias=bias)
    d_out, _ = _cotangents(out, None, seed=seed)
    g = reflex.vjp("full", {"q": q, "k": k, "v": v, "bias": bias}, d_out, implementation=implementation)
    p = reflex.vjp("full", {"q": q, "k": k[..., perm, :], "v": v[..., perm, :], "bias": bias[..., perm]}, d_out,
                   implementation=implementation)
    assert max_abs(p["q"], g["q"]) <= 1e-13
    assert max_abs(p["k"], g["k"][..., perm, :]) <= 1e-13 and max_abs(p["v"], g["v"][..., perm, :]) <= 1e-13
    assert max_abs(p["bias"], g["bias"][..., perm]) <= 1e-13


# --- differentiable callable terms -----------------------------------------------------------------

class SlopeBias:
    """A learnable ALiBi-style term: ``value[h, i, j] = slopes[h]·(j − i)``; the protocol's example."""

    def __init__(self, slopes):
        self.params = {"slopes": slopes}

    def __call__(self, rows, cols):
        xp = _kernels.prepare(self.params["slopes"][None, :, None], self.params["slopes"][None, :, None],
                              self.params["slopes"][None, :, None]).xp
        distance = xp.astype(cols - rows, self.params["slopes"].dtype)
        return xp.reshape(self.params["slopes"], (-1, 1, 1)) * distance

    def vjp(self, rows, cols, d_value):
        xp = _kernels.prepare(d_value[None], d_value[None], d_value[None]).xp
        distance = xp.astype(cols - rows, d_value.dtype)
        g = d_value * distance  # (..., H, l, s): summed to the parameter's shape (H,)
        heads = int(self.params["slopes"].shape[0])
        return {"slopes": xp.sum(xp.reshape(xp.moveaxis(g, -3, 0), (heads, -1)), axis=1)}


def test_differentiable_term_gradients_are_summed_over_tiles(small_tiles):
    q, k, v = qkv_host(17, batch=(2,), heads=3, kv_heads=1, length=7, key_length=9, dim=4, value_dim=2)
    slopes = numpy.array([0.5, -0.25, 0.125])
    rng = numpy.random.default_rng(17)
    d_out, d_lse = rng.normal(size=(2, 3, 7, 2)), rng.normal(size=(2, 3, 7))

    def loss(s):
        p = _kernels.prepare(q, k, v)
        out, lse = _kernels.dense(p, scale=0.5, bias=SlopeBias(s))
        return float(numpy.sum(out * d_out) + numpy.sum(lse * d_lse))

    numeric = numpy.array([(loss(slopes + h) - loss(slopes - h)) / (2e-6) for h in numpy.eye(3) * 1e-6])
    p = _kernels.prepare(q, k, v)
    results = {}
    for kernel in ("dense", "tiled"):
        term = SlopeBias(slopes)
        out, lse = getattr(_kernels, kernel)(p, scale=0.5, bias=term)
        g = getattr(_kernels, f"{kernel}_backward")(p, out, lse, d_out, d_lse, scale=0.5, bias=term)
        results[kernel] = g.bias[0]["slopes"]
        assert max_abs(results[kernel], numeric) <= 1e-6 * numpy.abs(numeric).max()
    assert max_abs(results["dense"], results["tiled"]) <= 1e-13
    # the gather kernel evaluates the term on gathered key positions
    indices = numpy.broadcast_to(numpy.arange(9), (7, 9))
    out, lse = _kernels.gather(p, indices, scale=0.5, bias=SlopeBias(slopes))
    g = _kernels.gather_backward(p, indices, out, lse, d_out, d_lse, scale=0.5, bias=SlopeBias(slopes))
    assert max_abs(g.bias[0]["slopes"], results["dense"]) <= 1e-13


def test_engine_vjp_refuses_what_it_cannot_map():
    def two_calls(q, k, v, /, **_):
        p = _kernels.prepare(q, k, v)
        a = _kernels.dense(p, scale=1.0)[0]
        b = _kernels.dense(p, scale=2.0)[0]
        return a + b

    def transformed(q, k, v, /, **_):
        p = _kernels.prepare(2.0 * q, k, v)
        return _kernels.dense(p, scale=1.0)[0]

    q, k, v = qkv_host(1, batch=(), heads=1, kv_heads=1, length=2, key_length=3, dim=2, value_dim=2)
    d_out = numpy.ones((1, 2, 2))
    with pytest.raises(NotImplementedError, match="2 engine call"):
        engine_vjp(two_calls)({"q": q, "k": k, "v": v}, d_out)
    with pytest.raises(NotImplementedError, match="q reaches the engine transformed"):
        engine_vjp(transformed)({"q": q, "k": k, "v": v}, d_out)


def test_cli_lists_and_shows_vjp(capsys):
    from reflex.cli import main

    assert main(["list", "--vjp"]) == 0
    listed = capsys.readouterr().out
    assert "sliding_window" in listed and all(m.key not in listed.split() for m in reflex.list_mechanisms()
                                               if not m.has_vjp)
    assert main(["info", "full"]) == 0
    assert "vjp             yes" in capsys.readouterr().out


@pytest.mark.parametrize("key", ["gaussian_prior", "gaussian_transformer", "task_prior"])
def test_prior_terms_dense_equals_tiled(key, backend, small_tiles):
    """Differentiable prior terms (per-row and per-head parameters) summed over tiles on every backend."""
    m = reflex.get(key)
    for case in m.cases("tiny", 0):
        result = case.call(m, return_lse=True)
        d_out, d_lse = _cotangents(*result)
        inputs = {n: backend.asarray(x) for n, x in case.inputs.items()}
        grads = [reflex.vjp(key, inputs, backend.asarray(d_out), d_lse=backend.asarray(d_lse),
                            implementation=implementation, **case.params) for implementation in ("dense", "tiled")]
        reference = reflex.vjp(key, dict(case.inputs), d_out, d_lse=d_lse, implementation="dense", **case.params)
        assert set(grads[0]) == set(reference)
        for name in reference:
            for g in grads:
                assert max_abs(backend.to_numpy(g[name]), reference[name]) <= 1e-13, (case.variant, name)


@pytest.mark.parametrize("key", sorted(set(_engine_vjp_keys())))
def test_vjp_on_every_backend_matches_numpy(key, backend):
    """Each engine mechanism's VJP on the backend matrix (library, device, read-only inputs) equals
    the NumPy gradients, for the first tiny case."""
    m = reflex.get(key)
    case = m.cases("tiny", 0)[0]
    result = case.call(m, return_lse=True) if m.returns_lse else case.call(m)
    out, lse = result if m.returns_lse else (result, None)
    d_out, d_lse = _cotangents(out, lse)
    reference = reflex.vjp(key, dict(case.inputs), d_out, d_lse=d_lse, **case.params)
    moved = {n: backend.asarray(x) for n, x in case.inputs.items()}
    got = reflex.vjp(key, moved, backend.asarray(d_out), d_lse=None if d_lse is None else backend.asarray(d_lse),
                     **case.params)
    assert set(got) == set(reference)
    for name, g in got.items():
        assert max_abs(backend.to_numpy(g), reference[name]) <= 1e-12, name
