"""linear_recurrent_attention: ONNX's four rules against a literal loop on every backend; recurrent,
chunked, parallel and the Numba scan agree; state carry; strong decay; errors; VJP."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from reflex import random
from reflex.mechanisms.linear_recurrent import _draw
from tests.helpers import assert_vjp_matches_finite_differences, max_abs

RULES = [("linear", False), ("gated", False), ("gated", True), ("delta", False), ("gated_delta", False),
         ("gated_delta", True)]
FORMS = ["recurrent", "chunked", "parallel", "auto"]


def literal(q, k, v, *, rule, decay=None, beta=None, initial_state=None, scale=None):
    """ONNX LinearAttention's loop, written per (batch, kv head) in float64 from the schema's bullets."""
    B, H, T, D = q.shape
    G, E = k.shape[1], v.shape[-1]
    scale = 1 / numpy.sqrt(D) if scale is None else scale
    out = numpy.zeros((B, H, T, E))
    final = numpy.zeros((B, G, D, E))
    for b in range(B):
        for g in range(G):
            s = numpy.zeros((D, E)) if initial_state is None else initial_state[b, g].copy()
            for t in range(T):
                if decay is not None:
                    s = s * (numpy.exp(decay[b, g, t]) if decay.ndim == 3 else numpy.exp(decay[b, g, t])[:, None])
                u = v[b, g, t]
                if beta is not None:
                    u = beta[b, g, t] * (u - s.T @ k[b, g, t])
                s = s + numpy.outer(k[b, g, t], u)
                for h in range(g * (H // G), (g + 1) * (H // G)):
                    out[b, h, t] = scale * s.T @ q[b, h, t]
            final[b, g] = s
    return out, final


def inputs(seed=0, *, rule, per_dim, state=True, length=7, heads=4, kv_heads=2, dim=5, value_dim=3, batch=2):
    return _draw(seed, batch=batch, heads=heads, kv_heads=kv_heads, length=length, dim=dim, value_dim=value_dim,
                 rule=rule, per_dim=per_dim, state=state)


def call(backend, host, **params):
    arrays = {name: backend.asarray(x) for name, x in host.items()}
    q, k, v = arrays.pop("q"), arrays.pop("k"), arrays.pop("v")
    return reflex.linear_recurrent_attention(q, k, v, **arrays, **params)


@pytest.mark.parametrize("rule,per_dim", RULES)
@pytest.mark.parametrize("form", FORMS)
def test_matches_literal_loop_on_every_backend(backend, rule, per_dim, form):
    host = inputs(1, rule=rule, per_dim=per_dim)
    out, state = call(backend, host, update_rule=rule, form=form, chunk_size=3, return_state=True)
    want_out, want_state = literal(host["q"], host["k"], host["v"], rule=rule, decay=host.get("decay"),
                                   beta=host.get("beta"), initial_state=host.get("initial_state"))
    got = backend.to_numpy(out)
    assert got.dtype == numpy.float64 and got.shape == (2, 4, 7, 3)
    assert max_abs(got, want_out) <= 1e-13
    assert max_abs(backend.to_numpy(state), want_state) <= 1e-13


@pytest.mark.parametrize("rule,per_dim", RULES)
def test_gqa_reads_kv_head_h_over_group_and_mqa(rule, per_dim):
    """Query heads 0..2 read kv head 0, 3..5 kv head 1 (repeat-interleave); MQA (G = 1) too."""
    for kv_heads in (2, 1):
        host = inputs(2, rule=rule, per_dim=per_dim, heads=6, kv_heads=kv_heads)
        got = reflex.linear_recurrent_attention(host.pop("q"), host.pop("k"), host.pop("v"), update_rule=rule,
                                                form="chunked", **host)
        host = inputs(2, rule=rule, per_dim=per_dim, heads=6, kv_heads=kv_heads)
        want, _ = literal(host.pop("q"), host.pop("k"), host.pop("v"), rule=rule, **host)
        assert max_abs(got, want) <= 1e-13


@given(length=st.integers(1, 13), chunk=st.integers(1, 6), which=st.integers(0, len(RULES) - 1),
       state=st.booleans())
def test_forms_agree(length, chunk, which, state):
    """recurrent, chunked (any chunk, T not a multiple), parallel and the Numba scan: ≤ 1e-12."""
    rule, per_dim = RULES[which]
    host = inputs(3, rule=rule, per_dim=per_dim, state=state, length=length)
    results = []
    for form, size in (("recurrent", 1), ("chunked", chunk), ("parallel", 1), ("auto", 1)):
        q, k, v = host["q"], host["k"], host["v"]
        rest = {n: x for n, x in host.items() if n not in "qkv"}
        results.append(reflex.linear_recurrent_attention(q, k, v, update_rule=rule, form=form, chunk_size=size,
                                                         return_state=True, **rest))
    for out, final in results[1:]:
        assert max_abs(out, results[0][0]) <= 1e-12
        assert max_abs(final, results[0][1]) <= 1e-12


@pytest.mark.parametrize("rule,per_dim", [r for r in RULES if r[0] in ("gated", "gated_delta")])
def test_strong_decay_chunked_is_stable(rule, per_dim):
    """Log decay −50 per step (e^{−3200} across a chunk of 64): no overflow, no NaN, forms agree."""
    host = inputs(4, rule=rule, per_dim=per_dim, length=70)
    host["decay"] = numpy.full(host["decay"].shape, -50.0)
    if per_dim:
        host["decay"][..., 5, :] = -1e-3  # one slow step among fast ones
    else:
        host["decay"][..., 5] = -1e-3
    rest = {n: x for n, x in host.items() if n not in "qkv"}
    runs = []
    with numpy.errstate(over="raise", invalid="raise", divide="raise"):
        for form, size in (("recurrent", 1), ("chunked", 64), ("chunked", 7), ("parallel", 1)):
            runs.append(reflex.linear_recurrent_attention(host["q"], host["k"], host["v"], update_rule=rule,
                                                          form=form, chunk_size=size, return_state=True, **rest))
    for out, final in runs:
        assert numpy.all(numpy.isfinite(out)) and numpy.all(numpy.isfinite(final))
        assert max_abs(out, runs[0][0]) <= 1e-12 and max_abs(final, runs[0][1]) <= 1e-12


@pytest.mark.parametrize("form", ["recurrent", "chunked", "auto"])
@pytest.mark.parametrize("rule,per_dim", RULES)
def test_two_halves_with_the_state_carried_equal_one_run(rule, per_dim, form):
    host = inputs(5, rule=rule, per_dim=per_dim, length=12)
    full_out, full_state = call_host(host, rule, form, slice(0, 12), host.get("initial_state"))
    first, mid = call_host(host, rule, form, slice(0, 5), host.get("initial_state"))
    second, last = call_host(host, rule, form, slice(5, 12), mid)
    assert max_abs(numpy.concatenate([first, second], axis=-2), full_out) <= 1e-13
    assert max_abs(last, full_state) <= 1e-13


def call_host(host, rule, form, part, state):
    arrays = {n: x[..., part, :] if n in ("q", "k", "v") or (n == "decay" and x.ndim == 4) else x[..., part]
              for n, x in host.items() if n != "initial_state"}
    q, k, v = arrays.pop("q"), arrays.pop("k"), arrays.pop("v")
    return reflex.linear_recurrent_attention(q, k, v, update_rule=rule, form=form, chunk_size=4,
                                             initial_state=state, return_state=True, **arrays)


@pytest.mark.parametrize("rule,per_dim", RULES)
def test_numba_scan_equals_array_api_path(rule, per_dim):
    """Plain NumPy float64 takes the Numba scan ("auto"); array-api-strict takes the same recurrence in xp."""
    import array_api_strict

    host = inputs(6, rule=rule, per_dim=per_dim, length=9)
    numba_out, numba_state = call_host(host, rule, "auto", slice(0, 9), host.get("initial_state"))
    strict = {n: array_api_strict.asarray(x) for n, x in host.items()}
    q, k, v = strict.pop("q"), strict.pop("k"), strict.pop("v")
    out, state = reflex.linear_recurrent_attention(q, k, v, update_rule=rule, form="recurrent", return_state=True,
                                                   **strict)
    assert max_abs(numba_out, numpy.asarray(out)) <= 1e-13
    assert max_abs(numba_state, numpy.asarray(state)) <= 1e-13


def test_length_one_and_empty(backend):
    host = inputs(7, rule="gated_delta", per_dim=True, length=1)
    want, want_state = literal(host["q"], host["k"], host["v"], rule="gated_delta", decay=host["decay"],
                               beta=host["beta"], initial_state=host["initial_state"])
    for form in FORMS:
        out, state = call(backend, host, update_rule="gated_delta", form=form, return_state=True)
        assert max_abs(backend.to_numpy(out), want) <= 1e-13 and max_abs(backend.to_numpy(state), want_state) <= 1e-13
    empty = inputs(7, rule="gated", per_dim=False, length=0)
    for form in FORMS:
        out, state = call(backend, empty, update_rule="gated", form=form, return_state=True)
        assert backend.to_numpy(out).shape == (2, 4, 0, 3)
        assert max_abs(backend.to_numpy(state), empty["initial_state"]) == 0.0


def test_scale_and_retnet_parallel_form():
    """RetNet: O = ((τQKᵀ)∘Γ)V, Γ_ij = γ^{i−j}[i ≥ j], γ_h = 1 − 2^{−5−h}; scale pinned explicitly."""
    B, H, T, D, E = 1, 3, 9, 4, 2
    q, k, v = (random.normal(s, seed=(8, i)) for i, s in enumerate([(B, H, T, D), (B, H, T, D), (B, H, T, E)]))
    gamma = 1 - 2.0 ** (-5 - numpy.arange(H))
    decay = numpy.broadcast_to(numpy.log(gamma)[None, :, None], (B, H, T)).copy()
    i, j = numpy.arange(T)[:, None], numpy.arange(T)[None, :]
    weights = numpy.where(i >= j, gamma[:, None, None] ** numpy.maximum(i - j, 0), 0.0)
    want = ((0.7 * q @ numpy.swapaxes(k, -1, -2)) * weights) @ v
    for form in FORMS:
        got = reflex.linear_recurrent_attention(q, k, v, update_rule="gated", decay=decay, scale=0.7, form=form)
        assert max_abs(got, want) <= 1e-13


def test_compute_dtype_float32():
    host = inputs(9, rule="gated_delta", per_dim=False)
    rest = {n: x for n, x in host.items() if n not in "qkv"}
    for form in FORMS:
        got = reflex.linear_recurrent_attention(host["q"], host["k"], host["v"], update_rule="gated_delta", form=form,
                                                compute_dtype="float32", **rest)
        want = reflex.linear_recurrent_attention(host["q"], host["k"], host["v"], update_rule="gated_delta", **rest)
        assert got.dtype == numpy.float32 and 0 < max_abs(got, want) <= 1e-5


def test_registry_record():
    m = reflex.get("linear_recurrent")
    assert m.family == "K. state-recurrent linear" and m.returns_state and m.has_vjp
    for name in ("RetNet", "simple GLA", "GLA", "DeltaNet", "Gated DeltaNet", "KDA"):
        assert name in m.function.__doc__


def test_inputs_not_mutated():
    host = inputs(10, rule="gated_delta", per_dim=True)
    copies = {n: x.copy() for n, x in host.items()}
    for form in FORMS:
        call_host(host, "gated_delta", form, slice(0, 7), host["initial_state"])
    for n, x in host.items():
        assert numpy.array_equal(x, copies[n]), n


# --- errors ---------------------------------------------------------------------------------------

def base(rule="gated_delta", per_dim=False):
    host = inputs(11, rule=rule, per_dim=per_dim)
    return host.pop("q"), host.pop("k"), host.pop("v"), host


@pytest.mark.parametrize("change,match", [
    (lambda h: h.update(decay=-h["decay"] + 0.1), "decay holds log multipliers and must be <= 0"),
    (lambda h: h.update(decay=numpy.where(h["decay"] < -0.1, -numpy.inf, h["decay"])), "decay must be finite"),
    (lambda h: h.update(decay=h["decay"][..., :5]), r"decay must have shape \(..., G, T\)"),
    (lambda h: h.update(beta=h["beta"] + 2.5), r"beta must lie in \[0, 2\]"),
    (lambda h: h.update(beta=h["beta"] - 1.5), r"beta must lie in \[0, 2\]"),
    (lambda h: h.update(beta=h["beta"][:, :1]), r"beta must have shape \(..., G, T\)"),
    (lambda h: h.update(initial_state=h["initial_state"][..., :2]), r"initial_state must have shape \(..., G, D, E\)"),
    (lambda h: h.pop("decay"), "'gated_delta' requires decay"),
    (lambda h: h.pop("beta"), "'gated_delta' requires beta"),
])
def test_bad_arrays(change, match):
    q, k, v, host = base()
    change(host)
    with pytest.raises(ValueError, match=match):
        reflex.linear_recurrent_attention(q, k, v, update_rule="gated_delta", **host)


def test_bad_options_and_forbidden_inputs():
    q, k, v, host = base()
    with pytest.raises(ValueError, match="'linear' forbids decay"):
        reflex.linear_recurrent_attention(q, k, v, update_rule="linear", decay=host["decay"])
    with pytest.raises(ValueError, match="'gated' forbids beta"):
        reflex.linear_recurrent_attention(q, k, v, update_rule="gated", decay=host["decay"], beta=host["beta"])
    with pytest.raises(ValueError, match="update_rule must be one of"):
        reflex.linear_recurrent_attention(q, k, v, update_rule="mamba")
    with pytest.raises(ValueError, match="form must be one of"):
        reflex.linear_recurrent_attention(q, k, v, update_rule="linear", form="quadratic")
    with pytest.raises(ValueError, match="chunk_size must be an int"):
        reflex.linear_recurrent_attention(q, k, v, update_rule="linear", chunk_size=0)
    with pytest.raises(ValueError, match="must match"):
        reflex.linear_recurrent_attention(q[..., :3, :], k, v, update_rule="linear")
    with pytest.raises(TypeError, match="decay must be a real floating"):
        reflex.linear_recurrent_attention(q, k, v, update_rule="gated", decay=numpy.zeros((2, 2, 7), dtype=int))


# --- gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule,per_dim", RULES)
def test_vjp_matches_finite_differences(rule, per_dim):
    host = inputs(12, rule=rule, per_dim=per_dim, length=5, batch=1, dim=3, value_dim=2)
    d_out = random.normal((1, 4, 5, 2), seed=(12, 7))
    d_state = random.normal((1, 2, 3, 2), seed=(12, 8))
    grads = assert_vjp_matches_finite_differences("linear_recurrent", host, d_out, d_state=d_state,
                                                  params={"update_rule": rule, "form": "chunked", "chunk_size": 2})
    assert set(grads) == set(host)


@pytest.mark.parametrize("rule,per_dim", RULES)
def test_vjp_on_every_backend_and_strong_decay(backend, rule, per_dim):
    """The VJP runs on every backend (same numbers as NumPy), and under log decay −50 stays finite
    and matches central differences of the chunked form."""
    host = inputs(13, rule=rule, per_dim=per_dim, length=6, batch=1, dim=3, value_dim=2)
    if "decay" in host:
        odd = numpy.arange(6) % 2 == 1
        host["decay"] = numpy.where(odd[:, None] if per_dim else odd, -50.0, host["decay"])
    d_out = random.normal((1, 4, 6, 2), seed=(13, 7))
    d_state = random.normal((1, 2, 3, 2), seed=(13, 8))
    want = reflex.vjp("linear_recurrent", host, d_out, d_state=d_state, update_rule=rule)
    got = reflex.vjp("linear_recurrent", {n: backend.asarray(x) for n, x in host.items()}, backend.asarray(d_out),
                     d_state=backend.asarray(d_state), update_rule=rule)
    for name in host:
        g = backend.to_numpy(got[name])
        assert numpy.all(numpy.isfinite(g)) and max_abs(g, want[name]) <= 1e-13, name
    if backend.name == "numpy":
        assert_vjp_matches_finite_differences("linear_recurrent", host, d_out, d_state=d_state,
                                              params={"update_rule": rule, "form": "chunked", "chunk_size": 4})


def autograd_gradients(key, host, d_out, d_state, *, positional=("q", "k", "v"), **params):
    """Gradients of ⟨d_out, out⟩ + ⟨d_state, state⟩ by torch autograd through the forward (float64):
    an independent differentiation of whichever form ``params`` selects."""
    torch = pytest.importorskip("torch")
    tensors = {n: torch.tensor(x, requires_grad=True) for n, x in host.items()}
    args = [tensors[n] for n in positional]
    kwargs = {n: t for n, t in tensors.items() if n not in positional}
    out, state = reflex.get(key).function(*args, **kwargs, return_state=True, **params)
    total = (out * torch.tensor(d_out)).sum() + (state * torch.tensor(d_state)).sum()
    grads = torch.autograd.grad(total, list(tensors.values()))
    return {n: g.numpy() for n, g in zip(tensors, grads)}


def check_vjp_against_autograd_of_every_form(key, host, d_out, d_state, *, positional=("q", "k", "v"), **params):
    """The reverse-time scan (reflex.vjp) equals autograd through the recurrent, chunked and parallel
    forms ≤ 1e-12 — hence recurrent ≡ chunked gradients."""
    want = reflex.vjp(key, host, d_out, d_state=d_state, **params)
    for form, chunk in (("recurrent", 1), ("chunked", 3), ("chunked", 1), ("parallel", 1)):
        got = autograd_gradients(key, host, d_out, d_state, positional=positional, form=form, chunk_size=chunk,
                                 **params)
        for name in host:
            scale = max(1.0, float(numpy.max(numpy.abs(want[name]))))
            assert max_abs(got[name], want[name]) <= 1e-12 * scale, (form, chunk, name)


@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("rule,per_dim", RULES)
def test_vjp_equals_autograd_through_every_form(rule, per_dim, strong):
    host = inputs(14, rule=rule, per_dim=per_dim, length=7, batch=1, dim=3, value_dim=2)
    if strong and "decay" in host:
        host["decay"] = numpy.full(host["decay"].shape, -50.0)
    d_out = random.normal((1, 4, 7, 2), seed=(14, 7))
    d_state = random.normal((1, 2, 3, 2), seed=(14, 8))
    check_vjp_against_autograd_of_every_form("linear_recurrent", host, d_out, d_state, update_rule=rule)


@pytest.mark.parametrize("slab", [1, 2, 3])
@pytest.mark.parametrize("rule,per_dim", RULES)
def test_chunked_slabs_of_any_size_agree(monkeypatch, rule, per_dim, slab):
    """The chunked form groups chunks in slabs (state-independent work batched): 1, 2 or 3 chunks per
    slab, T = 17 with chunks of 4 (a short last chunk), equals the recurrence."""
    from reflex.mechanisms import _recurrent

    host = inputs(15, rule=rule, per_dim=per_dim, length=17)
    want = call_host(host, rule, "recurrent", slice(0, 17), host.get("initial_state"))
    decay_dim = 5 if per_dim else 1
    monkeypatch.setattr(_recurrent, "SLAB_ELEMENTS", slab * 2 * 2 * 4 * 4 * max(decay_dim, 8))
    got = call_host(host, rule, "chunked", slice(0, 17), host.get("initial_state"))
    assert max_abs(got[0], want[0]) <= 1e-12 and max_abs(got[1], want[1]) <= 1e-12
