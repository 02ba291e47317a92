"""VJPs of the formula mechanisms (issue: reference gradients, part 2).

One place for the shared parametrisation: every mechanism in ``FORMULA_KEYS`` is checked against
central differences on its registry cases (tiny and small), on every backend of the matrix against
plain NumPy, recurrent ≡ parallel, and at its exact limits.
"""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from reflex.mechanisms import _grad
from tests.helpers import assert_vjp_matches_finite_differences, max_abs, qkv_host

FORMULA_KEYS = ["linear", "performer", "rfa", "cosformer", "nystrom", "talking_heads", "synthesizer", "linformer",
                "average", "memory_compressed", "residual", "poolingformer", "lowrank_band",
                "adaptive_span", "multi_scale", "hard_gaussian", "shared_map", "collaborative", "head_diversity", "isab", "luna", "predictive",
                "clustered", "improved_clustered", "probsparse",
                "capsule_routing"]


def _case_ids(sizes):
    return [(key, size, case.variant) for key in FORMULA_KEYS for size in sizes
            for case in reflex.get(key).cases(size, 0)]


def _case(key, size, variant):
    return next(c for c in reflex.get(key).cases(size, 0) if c.variant == variant)


def _d_out(mechanism, case, seed=13):
    out = case.call(mechanism)
    out = numpy.asarray(out[0] if isinstance(out, tuple) else out)
    return random.normal(out.shape, seed=(seed, 1))


@pytest.mark.parametrize("key,size,variant", _case_ids(("tiny", "small")))
def test_vjp_matches_central_differences(key, size, variant):
    """Every floating input of every registry case, relative error <= 1e-6 (small: a seeded subset)."""
    m, case = reflex.get(key), _case(key, size, variant)
    assert_vjp_matches_finite_differences(key, dict(case.inputs), _d_out(m, case), params=dict(case.params),
                                          max_entries=200 if size == "tiny" else 24)


@pytest.mark.parametrize("key,size,variant", _case_ids(("tiny",)))
def test_vjp_on_every_backend_equals_numpy(backend, key, size, variant):
    m, case = reflex.get(key), _case(key, size, variant)
    d_out = _d_out(m, case)
    expected = reflex.vjp(key, dict(case.inputs), d_out, **case.params)
    got = reflex.vjp(key, {n: backend.asarray(a) for n, a in case.inputs.items()}, backend.asarray(d_out),
                     **case.params)
    assert set(got) == set(expected)
    for name, g in got.items():
        host = backend.to_numpy(g)
        assert host.dtype == numpy.float64 and host.shape == case.inputs[name].shape
        assert max_abs(host, expected[name]) <= 1e-12 * max(1.0, numpy.max(numpy.abs(expected[name]))), name


# --- the kernelised family: forms, blocks, limits --------------------------------------------------

KERNELISED = [
    ("linear", {}), ("linear", {"feature_map": "relu"}),
    ("performer", {"kernel": "softmax_pos"}), ("performer", {"kernel": "softmax_trig", "scale": 0.1}),
    ("performer", {"kernel": "relu"}), ("rfa", {}), ("rfa", {"gate": True}), ("cosformer", {}),
]


def _kernelised_inputs(key, options, length, key_length, seed=3):
    q, k, v = qkv_host(seed, length=length, key_length=key_length)
    inputs = {"q": q, "k": k, "v": v}
    params = {n: o for n, o in options.items() if n != "gate"}
    if key in ("performer", "rfa"):
        inputs["projection"] = random.normal((12, q.shape[-1]), seed=(seed, 5))
    if options.get("gate"):
        inputs["gate"] = random.uniform((2, k.shape[-3], key_length), seed=(seed, 6), low=0.3, high=1.0)
    return inputs, params


@pytest.mark.parametrize("key,options", KERNELISED)
@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("shape", [(7, 11), (11, 4), (1, 1), (5, 5)])
def test_recurrent_gradient_equals_parallel(key, options, causal, shape, monkeypatch):
    """Back-propagation through the RNN (one key at a time) ≡ reversed prefix sums over key blocks
    (default blocks, and blocks of 3 so the carried adjoints cross block edges) ≤ 1e-12."""
    inputs, params = _kernelised_inputs(key, options, *shape)
    d_out = random.normal((2, 4, shape[0], 3), seed=(4, 4))
    grads = [reflex.vjp(key, inputs, d_out, causal=causal, implementation=form, **params)
             for form in ("recurrent", "parallel", "quadratic")]
    monkeypatch.setitem(_grad.kernelized_vjp.__kwdefaults__, "block", 3)
    grads.append(reflex.vjp(key, inputs, d_out, causal=causal, **params))
    for other in grads[1:]:
        for name, g in grads[0].items():
            assert max_abs(g, other[name]) <= 1e-12 * max(1.0, numpy.max(numpy.abs(g))), name


def _torch_dense(key, inputs, params):
    """An explicit dense (L, S) kernel-matrix form of each kernelised mechanism in torch (the independent
    reference whose autograd gradient the VJP must equal)."""
    torch = pytest.importorskip("torch")
    t = {n: torch.tensor(a, requires_grad=True) for n, a in inputs.items()}
    q, k, v = t["q"], t["k"], t["v"]
    r = q.shape[-3] // k.shape[-3]
    kk, vv = k.repeat_interleave(r, dim=-3), v.repeat_interleave(r, dim=-3)
    L, S = q.shape[-2], k.shape[-2]
    causal = params.get("causal", False)
    offset = None if not causal else (0 if causal in (True, "top_left") else S - L)
    if key == "linear":
        phi = (lambda x: torch.where(x > 0, x + 1, torch.exp(torch.clamp(x, max=0)))) \
            if params.get("feature_map", "elu") == "elu" else torch.relu
        a = phi(q) @ phi(kk).transpose(-1, -2)
    elif key == "performer":  # softmax_pos, unstabilised
        w, s = t["projection"], 1 / numpy.sqrt(q.shape[-1])

        def phi(x):
            x = numpy.sqrt(s) * x
            return torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)) / numpy.sqrt(w.shape[0])
        a = phi(q) @ phi(kk).transpose(-1, -2)
    if offset is not None:
        a = a * (torch.arange(S)[None, :] <= torch.arange(L)[:, None] + offset)
    eps = params.get("eps", 1e-6) if key == "linear" else 0.0
    return t, (a @ vv) / (a.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("key,options", [("linear", {}), ("linear", {"feature_map": "relu"}), ("performer", {})])
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_gradient_equals_autograd_of_the_dense_formula(key, options, causal):
    """The (L, S) kernel-matrix formula differentiated by torch autograd = the VJP ≤ 1e-12."""
    torch = pytest.importorskip("torch")
    inputs, params = _kernelised_inputs(key, options, 6, 9)
    params = {**params, "causal": causal}
    d_out = random.normal((2, 4, 6, 3), seed=(5, 5))
    t, out = _torch_dense(key, inputs, params)
    out.backward(torch.tensor(d_out))
    got = reflex.vjp(key, inputs, d_out, **params)
    for name, x in t.items():
        want = x.grad.numpy()
        assert max_abs(got[name], want) <= 1e-12 * max(1.0, numpy.max(numpy.abs(want))), name


def test_performer_gradient_approaches_softmax_gradient():
    """Many positive random features: Performer's dq, dk, dv approach full attention's (a statistical
    limit, so a loose bound; it tightens as m grows)."""
    torch = pytest.importorskip("torch")
    q, k, v = (0.5 * a for a in qkv_host(6, heads=2, kv_heads=2, length=5, key_length=6, dim=4))
    d_out = random.normal((2, 2, 5, 3), seed=(6, 6))
    projection = random.normal((40000, 4), seed=(6, 7))
    got = reflex.vjp("performer", {"q": q, "k": k, "v": v, "projection": projection}, d_out)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    torch.softmax(tq @ tk.transpose(-1, -2) / 2.0, dim=-1).matmul(tv).backward(torch.tensor(d_out))
    for name, x in (("q", tq), ("k", tk), ("v", tv)):
        want = x.grad.numpy()
        assert max_abs(got[name], want) <= 0.05 * numpy.max(numpy.abs(want)), name


def test_linear_callable_feature_map_needs_its_grad():
    q, k, v = qkv_host(7)
    d_out = random.normal((2, 4, 7, 3), seed=(7, 7))
    inputs = {"q": q, "k": k, "v": v}

    def elu1(x):
        xp = reflex.backends.namespace(x)
        return xp.where(x > 0, x + 1.0, xp.exp(xp.where(x > 0, 0.0, x)))

    def elu1_grad(x, d):
        xp = reflex.backends.namespace(x)
        return d * xp.exp(xp.where(x > 0, 0.0, x))

    with pytest.raises(ValueError, match="feature_map_grad"):
        reflex.vjp("linear", inputs, d_out, feature_map=elu1, causal=True)
    with pytest.raises(ValueError, match="feature_map_grad"):
        reflex.vjp("linear", inputs, d_out, feature_map_grad=elu1_grad)
    got = reflex.vjp("linear", inputs, d_out, feature_map=elu1, feature_map_grad=elu1_grad, causal=True)
    want = reflex.vjp("linear", inputs, d_out, causal=True)
    for name in inputs:
        assert max_abs(got[name], want[name]) == 0.0


def test_kernelised_vjp_edges():
    """Empty sequences give zero gradients; queries that attend nothing (causal, bottom-right with
    L > S) get dq = 0."""
    q, k, v = qkv_host(8, length=6, key_length=2)
    d_out = random.normal((2, 4, 6, 3), seed=(8, 8))
    g = reflex.vjp("linear", {"q": q, "k": k, "v": v}, d_out, causal="bottom_right")
    assert numpy.all(g["q"][..., :4, :] == 0) and numpy.any(g["q"][..., 4:, :] != 0)
    empty = reflex.vjp("linear", {"q": q[..., :0, :], "k": k, "v": v}, d_out[..., :0, :], causal=True)
    assert numpy.all(empty["k"] == 0) and numpy.all(empty["v"] == 0) and empty["q"].shape == (2, 4, 0, 5)


def _torch_softmax_attention_grads(q, k, v, d_out, scale):
    """dq, dk, dv of softmax(scale·QKᵀ)V (kv heads repeated) by torch autograd: the `full` gradient."""
    torch = pytest.importorskip("torch")
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    r = q.shape[-3] // k.shape[-3]
    s = scale * tq @ tk.repeat_interleave(r, dim=-3).transpose(-1, -2)
    torch.softmax(s, dim=-1).matmul(tv.repeat_interleave(r, dim=-3)).backward(torch.tensor(d_out))
    return {"q": tq.grad.numpy(), "k": tk.grad.numpy(), "v": tv.grad.numpy()}


@pytest.mark.parametrize("pinv", ["exact", "iterative"])
def test_nystrom_with_every_position_a_landmark_has_the_full_gradient(pinv):
    """m = L = S: F = A = B = P and F·A⁺·B = P, so the gradient is full attention's (≤ 1e-12 with the
    exact inverse; 40 Newton–Schulz steps converge to it as well). Self-attention (k = q) keeps A
    diagonally dominant (condition number ~60): round-off grows with A's conditioning."""
    q, _, v = qkv_host(9, heads=2, kv_heads=2, length=6, key_length=6)
    k = q
    d_out = random.normal((2, 2, 6, 3), seed=(9, 9))
    got = reflex.vjp("nystrom", {"q": q, "k": k, "v": v}, d_out, num_landmarks=6, pinv=pinv, iterations=40)
    want = _torch_softmax_attention_grads(q, k, v, d_out, 1 / numpy.sqrt(5))
    for name in want:
        assert max_abs(got[name], want[name]) <= 1e-12 * max(1.0, numpy.max(numpy.abs(want[name]))), name


def _torch_attention_grads(q, k, v, d_out, scale, bias=None, causal=False):
    """dq, dk, dv of softmax(scale·QKᵀ)V by torch autograd, kv heads repeated to q's (the `full` gradient)."""
    torch = pytest.importorskip("torch")
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    s = scale * tq @ tk.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3).transpose(-1, -2)
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -torch.inf)
    out = torch.softmax(s, dim=-1).matmul(tv.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3))
    out.backward(torch.tensor(d_out))
    return {"q": tq.grad.numpy(), "k": tk.grad.numpy(), "v": tv.grad.numpy()}


def _close(got, want, tol=1e-12):
    for name in want:
        assert max_abs(got[name], want[name]) <= tol * max(1.0, numpy.max(numpy.abs(want[name]))), name


@pytest.mark.parametrize("causal", [False, True])
def test_talking_heads_identity_mixing_has_the_full_gradient(causal):
    q, k, _ = qkv_host(10, length=6, key_length=6)
    v = random.normal((2, 4, 6, 3), seed=(10, 3))
    d_out = random.normal((2, 4, 6, 3), seed=(10, 4))
    eye = numpy.eye(4)
    got = reflex.vjp("talking_heads", {"q": q, "k": k, "v": v, "p_logits": eye, "p_weights": eye}, d_out, causal=causal)
    _close(got, _torch_attention_grads(q, k, v, d_out, 1 / numpy.sqrt(5), causal=causal))


@pytest.mark.parametrize("causal", [False, True])
def test_synthesizer_random_scaled_qk_has_the_full_gradient(causal):
    """R = scale·QKᵀ: chaining dR through QKᵀ gives full attention's dq, dk; dv is full's dv."""
    q, k, v = qkv_host(11, length=6, key_length=6)
    d_out = random.normal((2, 4, 6, 3), seed=(11, 4))
    scale = 1 / numpy.sqrt(5)
    k_heads = numpy.repeat(k, 2, axis=-3)
    r = scale * q @ numpy.swapaxes(k_heads, -1, -2)
    got = reflex.vjp("synthesizer", {"v": v, "random_matrix": r}, d_out, variant="random", causal=causal)
    d_r = got["random_matrix"]
    d_k = (scale * numpy.swapaxes(d_r, -1, -2) @ q).reshape(2, 2, 2, 6, 5).sum(axis=2)
    _close({"q": scale * d_r @ k_heads, "k": d_k, "v": got["v"]},
           _torch_attention_grads(q, k, v, d_out, scale, causal=causal))


def test_synthesizer_tiling_lse_and_mask():
    """The 'tile' repeat functions, an lse cotangent and a mask with a fully masked row, by central differences."""
    m, case = reflex.get("synthesizer"), _case("synthesizer", "tiny", "factorized_dense")
    mask = numpy.ones((4, 4), dtype=bool)
    mask[1] = False
    mask[2, :2] = False
    params = {"variant": "factorized_dense", "tiling": "tile", "mask": mask}
    inputs = dict(case.inputs)
    out, lse = m.function(inputs.pop("v"), **inputs, **params, return_lse=True)
    d_lse = random.normal(numpy.asarray(lse).shape, seed=(12, 2))
    grads = assert_vjp_matches_finite_differences("synthesizer", dict(case.inputs), _d_out(m, case), d_lse=d_lse,
                                                  params=params)
    assert numpy.any(grads["x"] != 0)


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_linformer_identity_projections_have_the_full_gradient(implementation):
    """E = F = I (k = S): the engine's backward on (Q, K, V), chained through E and F, is full's."""
    q, k, v = qkv_host(12, length=5, key_length=7)
    d_out = random.normal((2, 4, 5, 3), seed=(12, 4))
    got = reflex.vjp("linformer", {"q": q, "k": k, "v": v, "e_proj": numpy.eye(7)}, d_out, implementation=implementation)
    _close(got, _torch_attention_grads(q, k, v, d_out, 1 / numpy.sqrt(5)))


@pytest.mark.parametrize("length", [1, 2, 9])
def test_average_recurrent_gradient_equals_parallel(length):
    case = _case("average", "tiny", "causal_ffn")
    inputs = {**case.inputs, "x": random.normal((2, length, int(case.inputs["x"].shape[-1])), seed=(13, 0))}
    d_out = random.normal(inputs["x"].shape, seed=(13, 1))
    grads = [reflex.vjp("average", inputs, d_out, implementation=form) for form in ("recurrent", "parallel")]
    for name, g in grads[0].items():
        assert max_abs(g, grads[1][name]) <= 1e-12 * max(1.0, numpy.max(numpy.abs(g))), name
    with pytest.raises(ValueError, match="return_average"):
        reflex.vjp("average", inputs, d_out, return_average=True)


def test_residual_scores_cotangent_by_central_differences():
    """⟨d_out, out⟩ + ⟨d_scores, scores⟩ (the raw scores feed the next layer) against central differences."""
    case = _case("residual", "tiny", "prev_scores_causal")
    inputs = dict(case.inputs)
    out, scores = reflex.residual_attention(inputs["q"], inputs["k"], inputs["v"], prev_scores=inputs["prev_scores"],
                                            **case.params)
    d_out, d_scores = random.normal(out.shape, seed=(14, 1)), random.normal(scores.shape, seed=(14, 2))

    def loss(values):
        o, s = reflex.residual_attention(values["q"], values["k"], values["v"], prev_scores=values["prev_scores"],
                                         **case.params)
        return float(numpy.sum(o * d_out) + numpy.sum(s * d_scores))

    got = reflex.vjp("residual", inputs, d_out, d_scores=d_scores, **case.params)
    for name, x in inputs.items():
        fd = numpy.zeros(x.shape)
        for index in numpy.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[index] += 6e-6
            minus[index] -= 6e-6
            fd[index] = (loss({**inputs, name: plus}) - loss({**inputs, name: minus})) / 1.2e-5
        assert max_abs(got[name], fd) <= 1e-6 * numpy.max(numpy.abs(got[name])) + 1e-10, name


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_adaptive_span_gradient_of_the_span(implementation, small_tiles):
    """d spans (the paper's learnt z) by central differences, dense and tile by tile; it is nonzero."""
    q, k, v = qkv_host(15, length=6, key_length=8)
    inputs = {"q": q, "k": k, "v": v, "spans": numpy.array([0.4, 1.7, 3.2, 6.5])}
    params = {"ramp": 2.5, "implementation": implementation}
    grads = assert_vjp_matches_finite_differences("adaptive_span", inputs, random.normal((2, 4, 6, 3), seed=(15, 1)),
                                                  params=params)
    assert numpy.all(grads["spans"] != 0)


@pytest.mark.parametrize("causal", [False, True])
def test_hard_gaussian_offset_and_width_gradients(causal):
    q, k, v = qkv_host(16, length=5, key_length=7)
    inputs = {"q": q, "k": k, "v": v, "offsets": numpy.array([-1.0, 0.5, 1.0, 2.0]),
              "sigmas": numpy.array([1.0, 0.7, 2.0, 1.5])}
    grads = assert_vjp_matches_finite_differences("hard_gaussian", inputs, random.normal((2, 4, 5, 3), seed=(16, 1)),
                                                  params={"causal": causal})
    assert numpy.all(grads["q"] == 0) and numpy.all(grads["k"] == 0) and numpy.all(grads["sigmas"] != 0)


def test_luna_packed_cotangents_by_central_differences():
    """Luna's P' = (P'_K, P'_V) is its second output (the next layer's P): its cotangents reach q, k, v, p."""
    case = _case("luna", "tiny", "per_sequence")
    inputs = dict(case.inputs)
    out, pk, pv = reflex.luna_attention(inputs["q"], inputs["k"], inputs["v"], p=inputs["p"], return_packed=True)
    d_out, d_pk, d_pv = (random.normal(a.shape, seed=(17, i)) for i, a in enumerate((out, pk, pv)))

    def loss(values):
        o, a, b = reflex.luna_attention(values["q"], values["k"], values["v"], p=values["p"], return_packed=True)
        return float(numpy.sum(o * d_out) + numpy.sum(a * d_pk) + numpy.sum(b * d_pv))

    got = reflex.vjp("luna", inputs, d_out, d_packed_k=d_pk, d_packed_v=d_pv)
    for name, x in inputs.items():
        fd = numpy.zeros(x.shape)
        for index in numpy.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[index] += 6e-6
            minus[index] -= 6e-6
            fd[index] = (loss({**inputs, name: plus}) - loss({**inputs, name: minus})) / 1.2e-5
        assert max_abs(got[name], fd) <= 1e-6 * numpy.max(numpy.abs(got[name])) + 1e-10, name


def test_predictive_gradient_of_alpha():
    """d alpha (alpha given in inputs as a 0-d array) against central differences of the float option."""
    case = _case("predictive", "tiny", "conv1x3_bias_causal")
    m = reflex.get("predictive")
    d_out = _d_out(m, case)
    params = {n: o for n, o in case.params.items() if n != "alpha"}
    got = reflex.vjp("predictive", {**case.inputs, "alpha": numpy.asarray(0.25)}, d_out, **params)

    def loss(alpha):
        return float(numpy.sum(case.call(m, alpha=alpha) * d_out))

    fd = (loss(0.25 + 6e-6) - loss(0.25 - 6e-6)) / 1.2e-5
    assert got["alpha"].shape == () and abs(float(got["alpha"]) - fd) <= 1e-6 * abs(fd) + 1e-10


def test_improved_clustered_with_every_key_recomputed_has_the_full_gradient():
    """topk = S: each query's exact softmax over all keys, m̂ = 1 — the gradient is full attention's."""
    q, k, v = qkv_host(18, length=6, key_length=5)
    assignment = random.integers((2, 4, 6), seed=(18, 5), low=0, high=3)
    d_out = random.normal((2, 4, 6, 3), seed=(18, 6))
    got = reflex.vjp("improved_clustered", {"q": q, "k": k, "v": v, "assignment": assignment}, d_out, topk=5,
                     num_clusters=3)
    _close(got, reflex.vjp("full", {"q": q, "k": k, "v": v}, d_out))


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_probsparse_every_query_active_has_the_full_gradient(causal):
    q, k, v = qkv_host(19, length=6, key_length=8)
    d_out = random.normal((2, 4, 6, 3), seed=(19, 6))
    got = reflex.vjp("probsparse", {"q": q, "k": k, "v": v}, d_out, top_u=6, causal=causal)
    _close(got, reflex.vjp("full", {"q": q, "k": k, "v": v}, d_out, causal=causal))


@pytest.mark.parametrize("causal", [False, "bottom_right", "top_left"])
def test_probsparse_lazy_rows_by_central_differences(causal):
    """top_u = 0 (every row the (cumulative) mean of V; L > S so some rows see no key), and top_u = 2."""
    q, k, v = qkv_host(20, length=9, key_length=5)
    d_out = random.normal((2, 4, 9, 3), seed=(20, 6))
    samples = random.integers((9, 3), seed=(20, 7), low=0, high=5)
    for top_u in (0, 2):
        assert_vjp_matches_finite_differences("probsparse", {"q": q, "k": k, "v": v, "sample_indices": samples}, d_out,
                                              params={"top_u": top_u, "causal": causal})


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_capsule_routing_em_unrolled_without_activations(iterations):
    """EM routing with default activations, λ ≠ 1, through 1, 2 and 5 unrolled rounds."""
    heads_out = random.normal((2, 3, 4, 5), seed=(21, 0))
    transforms = random.normal((3, 2, 5, 3), seed=(21, 1), std=0.5)
    d_out = random.normal((2, 4, 6), seed=(21, 2))
    assert_vjp_matches_finite_differences("capsule_routing", {"heads_out": heads_out, "transforms": transforms}, d_out,
                                          params={"variant": "em", "iterations": iterations, "beta_a": 0.3,
                                                  "beta_v": -0.2, "inverse_temperature": 2.0})


def _vjp_peak(key, length, **params):
    import tracemalloc

    q, k, v = qkv_host(22, batch=(1,), heads=1, kv_heads=1, length=length, key_length=length, dim=4, value_dim=4)
    inputs = {"q": q, "k": k, "v": v}
    if key == "rfa":
        inputs["gate"] = random.uniform((1, 1, length), seed=(22, 3), low=0.5, high=1.0)
        inputs["projection"] = random.normal((8, 4), seed=(22, 4))
    if key == "nystrom":
        params["num_landmarks"] = 8
    d_out = random.normal((1, 1, length, 4), seed=(22, 5))
    tracemalloc.start()
    try:
        reflex.vjp(key, inputs, d_out, **params)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("key,params", [("linear", {"causal": True}), ("rfa", {"causal": True}), ("nystrom", {})])
def test_backward_memory_is_linear_in_length(key, params):
    """The causal kernelised backward (reversed prefix sums / the gated reversed scan) and Nyström's never
    hold an (L, S) array: doubling L at most ~doubles the peak (after a warm-up call: first-call
    allocations are not the backward's)."""
    _vjp_peak(key, 64, **params)
    small, large = _vjp_peak(key, 2048, **params), _vjp_peak(key, 4096, **params)
    assert large < 2.6 * small
    assert large < 4096 * 4096 * 8 / 4  # a quarter of one (L, S) float64 array
