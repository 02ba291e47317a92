"""VJPs of the positional mechanisms (alibi, t5_bias, rope, relative_shaw, xl_relative) and multi_head.

Central differences on every registry case (every floating input, incl. slopes, tables, u, v, W_R and
projection weights), every backend of the matrix against plain NumPy, dense ≡ tiled, and float64 torch
autograd anchors (explicit formulas, ``F.multi_head_attention_forward``) to ≤ 1e-12.
"""

from __future__ import annotations

import math

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import assert_vjp_matches_finite_differences, max_abs, qkv_host

KEYS = ["alibi", "t5_bias", "rope", "relative_shaw", "xl_relative", "multi_head"]
KEYS = [key for key in KEYS if reflex.get(key).has_vjp]


def _case_ids(sizes):
    return [(key, size, case.variant) for key in KEYS for size in sizes for case in reflex.get(key).cases(size, 0)]


def _case(key, size, variant):
    return next(c for c in reflex.get(key).cases(size, 0) if c.variant == variant)


def _d_out(key, case, seed=17):
    return random.normal(numpy.asarray(case.call(reflex.get(key))).shape, seed=(seed, 1))


def _d_lse(key, case, seed=17):
    """An lse cotangent for mechanisms returning one (FA4 differentiates (out, lse) jointly)."""
    if not reflex.get(key).returns_lse:
        return None
    out = numpy.asarray(case.call(reflex.get(key)))
    return random.normal(out.shape[:-1], seed=(seed, 2))


def _zero_by_invariance(case, name):
    """Inputs whose gradient is 0 in exact arithmetic: a key bias b_k shifts every score of a row by
    the same q_i·b_k (softmax is shift-invariant), so central differences see only rounding noise."""
    return name == "b_k"


@pytest.mark.parametrize("key,size,variant", _case_ids(("tiny", "small")))
def test_vjp_matches_central_differences(key, size, variant):
    """Every floating input of every registry case, relative error ≤ 1e-6 (small: a seeded subset)."""
    case = _case(key, size, variant)
    names = [n for n in case.inputs if not _zero_by_invariance(case, n)]
    grads = assert_vjp_matches_finite_differences(
        key, dict(case.inputs), _d_out(key, case), d_lse=_d_lse(key, case), params=dict(case.params), names=names,
        max_entries=60 if size == "tiny" else 12)
    for name in set(case.inputs) - set(names):
        scale = max(float(numpy.max(numpy.abs(numpy.asarray(g)))) for g in grads.values())
        assert float(numpy.max(numpy.abs(numpy.asarray(grads[name])))) <= 1e-13 * scale, name


@pytest.mark.parametrize("key,size,variant", _case_ids(("tiny",)))
def test_vjp_on_every_backend_equals_numpy(backend, key, size, variant):
    case = _case(key, size, variant)
    d_out, d_lse = _d_out(key, case), _d_lse(key, case)
    expected = reflex.vjp(key, dict(case.inputs), d_out, d_lse=d_lse, **case.params)
    on = {n: backend.asarray(a) for n, a in case.inputs.items()}
    got = reflex.vjp(key, on, backend.asarray(d_out), d_lse=None if d_lse is None else backend.asarray(d_lse),
                     **case.params)
    assert set(got) == set(expected)
    for name, g in got.items():
        host = backend.to_numpy(g)
        assert host.dtype == numpy.float64 and host.shape == case.inputs[name].shape
        assert max_abs(host, expected[name]) <= 1e-12 * max(1.0, float(numpy.max(numpy.abs(expected[name])))), name
    for name, x in on.items():  # inputs not mutated
        assert numpy.array_equal(backend.to_numpy(x), case.inputs[name])


@pytest.mark.parametrize("key,size,variant", [c for c in _case_ids(("tiny",)) if c[0] != "multi_head"])
def test_dense_and_tiled_backward_agree(small_tiles, backend, key, size, variant):
    """3 × 4 tiles on every backend: index-grid terms differentiated tile by tile (row-block gradients
    assembled, parameter gradients summed) equal the whole-grid NumPy backward ≤ 1e-13."""
    case = _case(key, size, variant)
    d_out, d_lse = _d_out(key, case), _d_lse(key, case)
    params = {n: p for n, p in case.params.items() if n != "implementation"}
    dense = reflex.vjp(key, dict(case.inputs), d_out, d_lse=d_lse, **params, implementation="dense")
    tiled = reflex.vjp(key, {n: backend.asarray(a) for n, a in case.inputs.items()}, backend.asarray(d_out),
                       d_lse=None if d_lse is None else backend.asarray(d_lse), **params, implementation="tiled")
    for name, g in dense.items():
        assert max_abs(backend.to_numpy(tiled[name]), g) <= 1e-13 * max(1.0, float(numpy.max(numpy.abs(g)))), name


@pytest.mark.parametrize("key", [k for k in KEYS if k != "multi_head"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (0, 4), (4, 0)])
def test_vjp_edges(key, shape):
    """L or S = 1 and empty sequences: finite gradients shaped like the inputs (empty → zeros)."""
    length, key_length = shape
    case = _case(key, "tiny", reflex.get(key).cases("tiny", 0)[0].variant)
    q, k, v = qkv_host(8, heads=4, kv_heads=2, length=length, key_length=key_length, dim=4, value_dim=3)
    inputs = {**{n: a for n, a in case.inputs.items() if n not in ("q", "k", "v")}, "q": q, "k": k, "v": v}
    if key == "xl_relative":
        inputs["w_r"] = random.normal((4, 4, 8), seed=(8, 5), std=0.3)
        inputs["content_bias"], inputs["position_bias"] = (random.normal((4, 4), seed=(8, i)) for i in (6, 7))
    if key == "relative_shaw":
        inputs["rel_k"], inputs["rel_v"] = random.normal((5, 4), seed=(8, 5)), random.normal((5, 3), seed=(8, 6))
    if key == "t5_bias":
        inputs["table"] = random.normal((32, 4), seed=(8, 5))
    if key == "alibi" and "slopes" in inputs:
        inputs["slopes"] = random.uniform((2, 4), seed=(8, 5), low=0.1, high=1.0)
    params = {n: p for n, p in case.params.items() if n not in ("query_offset",)}
    if key == "rope":
        inputs.pop("positions", None)
    d_out = random.normal((2, 4, length, 3), seed=(8, 9))
    grads = reflex.vjp(key, inputs, d_out, **params)
    for name, g in grads.items():
        g = numpy.asarray(g)
        assert g.shape == numpy.shape(inputs[name]) and numpy.all(numpy.isfinite(g)), name
        if length == 0 or key_length == 0:
            assert not numpy.any(g), name
    if length * key_length:
        assert_vjp_matches_finite_differences(key, inputs, d_out, params=params, max_entries=20)


# --- torch float64 autograd anchors ---------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


def _torch_attention(torch, q, k, v, bias=None, causal_offset=None, scale=None):
    """Explicit float64 softmax attention (GQA by repeat-interleave), the anchors' common core."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if bias is not None:
        s = s + bias
    if causal_offset is not None:
        i = torch.arange(q.shape[-2])[:, None]
        j = torch.arange(k.shape[-2])[None, :]
        s = s.masked_fill(j > i + causal_offset, -math.inf)
    return torch.softmax(s, dim=-1) @ v


def _leaves(torch, arrays):
    return {n: torch.from_numpy(numpy.array(a)).requires_grad_() for n, a in arrays.items()}


def _assert_matches_autograd(torch, key, inputs, out, d_out, params, *, exclude=()):
    out.backward(torch.from_numpy(d_out))
    grads = reflex.vjp(key, {n: a.detach().numpy() for n, a in inputs.items()}, d_out, **params)
    for name, leaf in inputs.items():
        if name in exclude or leaf.grad is None and not leaf.dtype.is_floating_point:
            continue
        want = leaf.grad.numpy()
        assert max_abs(grads[name], want) <= 1e-12 * max(1.0, float(numpy.max(numpy.abs(want)))), name


@pytest.mark.parametrize("symmetric,alignment,causal", [(True, "bottom_right", False), (True, "bottom_right", True),
                                                         (False, "top_left", True), (False, "top_left", False)])
def test_alibi_matches_torch_autograd(symmetric, alignment, causal):
    """q, k, v and the slopes against autograd of an explicit float64 formula (FlexAttention's ALiBi
    score_mod ``score + m_h·(kv_idx − q_idx)`` for symmetric=False, top_left)."""
    torch = _torch()
    q, k, v = qkv_host(21, heads=4, kv_heads=2, length=6, key_length=9, dim=5, value_dim=3)
    slopes = random.uniform((2, 4), seed=(21, 5), low=0.1, high=1.0)
    t = _leaves(torch, {"q": q, "k": k, "v": v, "slopes": slopes})
    delta = 9 - 6 if alignment == "bottom_right" else 0
    rel = (torch.arange(9)[None, :] - torch.arange(6)[:, None] - delta).double()
    dist = -rel.abs() if symmetric else rel
    bias = t["slopes"][..., None, None] * dist
    out = _torch_attention(torch, t["q"], t["k"], t["v"], bias, delta if causal else None)
    params = {"symmetric": symmetric, "alignment": alignment, "causal": causal}
    _assert_matches_autograd(torch, "alibi", t, out, random.normal(tuple(out.shape), seed=(21, 9)), params)


@pytest.mark.parametrize("convention", ["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [None, 4])
def test_rope_matches_torch_autograd(convention, rotary_dim):
    """dq, dk through an explicit torch rotation (cos/sin of p·θ_t, pairs by convention) and SDPA."""
    torch = _torch()
    q, k, v = qkv_host(22, heads=4, kv_heads=2, length=5, key_length=8, dim=6, value_dim=3)
    positions = random.integers((2, 1, 5), seed=(22, 5), low=0, high=40)
    t = _leaves(torch, {"q": q, "k": k, "v": v})
    r = 6 if rotary_dim is None else rotary_dim

    def rotate(x, pos):
        theta = torch.tensor([1.0 / 10000.0 ** (2 * i / r) for i in range(r // 2)], dtype=torch.float64)
        angle = pos.double()[..., None] * theta
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot, rest = x[..., :r], x[..., r:]
        a, b = (rot[..., : r // 2], rot[..., r // 2:]) if convention == "half" else (rot[..., 0::2], rot[..., 1::2])
        re, im = a * cos - b * sin, a * sin + b * cos
        out = torch.cat([re, im], -1) if convention == "half" else torch.stack([re, im], -1).flatten(-2)
        return torch.cat([out, rest], -1)

    rq, rk = rotate(t["q"], torch.from_numpy(positions)), rotate(t["k"], torch.arange(8))
    out = _torch_attention(torch, rq, rk, t["v"])
    params = {"convention": convention, "rotary_dim": rotary_dim}
    d_out = random.normal(tuple(out.shape), seed=(22, 9))
    out.backward(torch.from_numpy(d_out))
    grads = reflex.vjp("rope", {"q": q, "k": k, "v": v, "positions": positions}, d_out, **params)
    assert set(grads) == {"q", "k", "v"}
    for name in ("q", "k", "v"):
        want = t[name].grad.numpy()
        assert max_abs(grads[name], want) <= 1e-12 * max(1.0, float(numpy.max(numpy.abs(want)))), name


@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_multi_head_matches_torch_multi_head_attention_forward(biases, cross):
    """x (and x_kv), every projection weight and bias against F.multi_head_attention_forward, float64."""
    torch = _torch()
    n, heads, length, key_length = 8, 2, 5, 7
    x = random.normal((3, length, n), seed=(23, 0))
    arrays = {"x": x, "w_q": random.normal((n, n), seed=(23, 1), std=n ** -0.5),
              "w_k": random.normal((n, n), seed=(23, 2), std=n ** -0.5),
              "w_v": random.normal((n, n), seed=(23, 3), std=n ** -0.5),
              "w_o": random.normal((n, n), seed=(23, 4), std=n ** -0.5)}
    if cross:
        arrays["x_kv"] = random.normal((3, key_length, n), seed=(23, 5))
    if biases:
        arrays.update({f"b_{c}": random.normal((n,), seed=(23, 6 + i)) for i, c in enumerate("qkvo")})
    t = _leaves(torch, arrays)
    kv = t.get("x_kv", t["x"])
    in_bias = torch.cat([t["b_q"], t["b_k"], t["b_v"]]) if biases else None
    out, _ = torch.nn.functional.multi_head_attention_forward(
        t["x"].transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1), n, heads, None, in_bias, None, None, False,
        0.0, t["w_o"].T, t["b_o"] if biases else None, training=False, need_weights=False,
        use_separate_proj_weight=True, q_proj_weight=t["w_q"].T, k_proj_weight=t["w_k"].T, v_proj_weight=t["w_v"].T)
    out = out.transpose(0, 1)
    d_out = random.normal(tuple(out.shape), seed=(23, 9))
    out.backward(torch.from_numpy(d_out))
    mine = reflex.multi_head_attention(*(arrays[c] for c in ("x", "w_q", "w_k", "w_v", "w_o")), num_heads=heads,
                                       **{c: arrays[c] for c in arrays if c.startswith("b_") or c == "x_kv"})
    assert max_abs(mine, out.detach().numpy()) <= 1e-13
    grads = reflex.vjp("multi_head", arrays, d_out, num_heads=heads)
    assert set(grads) == set(arrays)
    for name, leaf in t.items():
        want = leaf.grad.numpy()
        assert max_abs(grads[name], want) <= 1e-12 * max(1.0, float(numpy.max(numpy.abs(want)))), name


def test_multi_head_gradients_pass_through_the_inner_mechanism():
    """An inner mechanism with its own VJP (alibi, causal) and GQA: central differences on every weight."""
    n, heads, kv_heads = 12, 4, 2
    arrays = {"x": random.normal((2, 5, n), seed=(24, 0)),
              "w_q": random.normal((n, heads * 3), seed=(24, 1), std=0.3),
              "w_k": random.normal((n, kv_heads * 3), seed=(24, 2), std=0.3),
              "w_v": random.normal((n, kv_heads * 2), seed=(24, 3), std=0.3),
              "w_o": random.normal((heads * 2, 7), seed=(24, 4), std=0.3)}
    params = {"num_heads": heads, "num_kv_heads": kv_heads, "mechanism": "alibi",
              "mechanism_params": {"causal": True}}
    d_out = random.normal((2, 5, 7), seed=(24, 9))
    assert_vjp_matches_finite_differences("multi_head", arrays, d_out, params=params, max_entries=40)
    with pytest.raises(ValueError, match="d_lse"):
        reflex.vjp("multi_head", arrays, d_out, d_lse=numpy.zeros((2, 5)), **params)


@pytest.mark.parametrize("clip,offset,causal", [(0, 0, False), (1, 2, "bottom_right"), (2, 0, "top_left"),
                                                (3, -1, False)])
@pytest.mark.parametrize("per_head", [False, True])
def test_relative_shaw_matches_torch_autograd(clip, offset, causal, per_head):
    """q, k, v, rel_k, rel_v against autograd of the explicit Shaw formula (eqs. 3–4) with materialised
    (L, S, ·) embeddings a_{c(j − i − offset)}, float64."""
    torch = _torch()
    q, k, v = qkv_host(25, heads=4, kv_heads=2, length=5, key_length=7, dim=4, value_dim=3)
    lead = (4,) if per_head else ()
    arrays = {"q": q, "k": k, "v": v, "rel_k": random.normal((*lead, 2 * clip + 1, 4), seed=(25, 5)),
              "rel_v": random.normal((*lead, 2 * clip + 1, 3), seed=(25, 6))}
    t = _leaves(torch, arrays)
    rel = torch.arange(7)[None, :] - torch.arange(5)[:, None] - offset
    index = rel.clamp(-clip, clip) + clip  # (L, S)
    a_k, a_v = t["rel_k"][..., index, :], t["rel_v"][..., index, :]  # (H|·, L, S, D|E)
    kk, vv = t["k"].repeat_interleave(2, dim=-3), t["v"].repeat_interleave(2, dim=-3)
    s = (t["q"] @ kk.transpose(-1, -2) + torch.einsum("...ld,...lsd->...ls", t["q"], a_k)) / 2.0
    if causal:
        delta = 2 if causal == "bottom_right" else 0
        s = s.masked_fill(torch.arange(7)[None, :] > torch.arange(5)[:, None] + delta, -math.inf)
    w = torch.softmax(s, dim=-1)
    out = w @ vv + torch.einsum("...ls,...lse->...le", w, a_v)
    params = {"query_offset": offset, "causal": causal}
    _assert_matches_autograd(torch, "relative_shaw", t, out, random.normal(tuple(out.shape), seed=(25, 9)), params)


@pytest.mark.parametrize("causal", ["bottom_right", False])
def test_xl_relative_matches_torch_autograd(causal):
    """q, k, v, W_R, u, v against autograd of the four-term formula of Dai et al. 2019 §3.3 with a
    materialised r_{i+δ−j} = W_R R_{i+δ−j}, float64."""
    torch = _torch()
    q, k, v = qkv_host(26, heads=4, kv_heads=2, length=4, key_length=7, dim=4, value_dim=3)
    arrays = {"q": q, "k": k, "v": v, "w_r": random.normal((4, 4, 6), seed=(26, 5), std=0.4),
              "content_bias": random.normal((4, 4), seed=(26, 6)), "position_bias": random.normal((4, 4), seed=(26, 7))}
    t = _leaves(torch, arrays)
    dist = (torch.arange(4)[:, None] + 3 - torch.arange(7)[None, :]).double()  # i + δ − j, δ = S − L
    omega = torch.tensor([1.0 / 10000.0 ** (2 * i / 6) for i in range(3)], dtype=torch.float64)
    sinusoid = torch.cat([torch.sin(dist[..., None] * omega), torch.cos(dist[..., None] * omega)], -1)  # (L, S, N)
    r = torch.einsum("hdn,lsn->hlsd", t["w_r"], sinusoid)
    kk, vv = t["k"].repeat_interleave(2, dim=-3), t["v"].repeat_interleave(2, dim=-3)
    qu = t["q"] + t["content_bias"][:, None, :]
    qv = t["q"] + t["position_bias"][:, None, :]
    s = (qu @ kk.transpose(-1, -2) + torch.einsum("bhld,hlsd->bhls", qv, r)) / 2.0
    if causal:
        s = s.masked_fill(torch.arange(7)[None, :] > torch.arange(4)[:, None] + 3, -math.inf)
    out = torch.softmax(s, dim=-1) @ vv
    _assert_matches_autograd(torch, "xl_relative", t, out, random.normal(tuple(out.shape), seed=(26, 9)),
                             {"causal": causal})


def test_relative_shaw_value_term_gradients_at_huge_scores():
    """Scores ~1e8: the value-term shares (a softmax over distance bins) and their gradients stay finite
    and equal a float64 formula evaluated on the shares themselves."""
    q, k, v = qkv_host(27, heads=2, kv_heads=2, length=4, key_length=4, dim=4, value_dim=3)
    inputs = {"q": q * 1e4, "k": k * 1e4, "v": v, "rel_k": random.normal((3, 4), seed=(27, 5)),
              "rel_v": random.normal((3, 3), seed=(27, 6))}
    d_out = random.normal((2, 2, 4, 3), seed=(27, 9))
    grads = reflex.vjp("relative_shaw", inputs, d_out)
    for name, g in grads.items():
        assert numpy.all(numpy.isfinite(numpy.asarray(g))), name
    # rel_v's gradient is Σ_i w_ir dO_i with w the (now one-hot) shares: each row puts dO_i on one bin
    assert numpy.allclose(numpy.sum(grads["rel_v"], axis=0), numpy.sum(d_out, axis=(0, 1, 2)), rtol=0, atol=1e-12)


def test_alibi_matches_flex_attention_score_mod():
    """FlexAttention eager with the ALiBi score_mod ``score + m_h·(kv_idx − q_idx)`` (symmetric=False,
    top_left), float64: the output everywhere; q, k, v and the captured slopes' gradients where
    FlexAttention has a backward (CUDA; its CPU path raises for backward)."""
    torch = _torch()
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = qkv_host(21, heads=4, kv_heads=2, length=6, key_length=9, dim=5, value_dim=3)
    slopes = random.uniform((4,), seed=(21, 5), low=0.1, high=1.0)
    params = {"alignment": "top_left", "symmetric": False}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = {n: torch.from_numpy(a).to(device).requires_grad_(device == "cuda")
         for n, a in {"q": q, "k": k, "v": v, "slopes": slopes}.items()}

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + t["slopes"][h] * (kv_idx - q_idx)

    out = flex.flex_attention(t["q"], t["k"], t["v"], score_mod=score_mod, enable_gqa=True)
    expected = reflex.alibi_attention(q, k, v, slopes=slopes, **params)
    assert max_abs(out.detach().cpu().numpy(), expected) <= 1e-13
    if device == "cpu":
        pytest.skip("FlexAttention has no CPU backward: gradients checked on CUDA only")
    d_out = random.normal(tuple(out.shape), seed=(21, 9))
    out.backward(torch.from_numpy(d_out).to(device))
    grads = reflex.vjp("alibi", {"q": q, "k": k, "v": v, "slopes": slopes}, d_out, **params)
    for name, leaf in t.items():
        want = leaf.grad.cpu().numpy()
        assert max_abs(grads[name], want) <= 1e-12 * max(1.0, float(numpy.max(numpy.abs(want)))), name
