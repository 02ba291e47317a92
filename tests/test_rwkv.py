"""rwkv6_attention and rwkv7_attention: literal loops (RWKV's own transposed-state convention for RWKV-7) on
every backend, forms agreeing (strong decay too), state carry, limit cases, Numba ≡ array API, errors, VJP."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from reflex.mechanisms import rwkv6, rwkv7
from tests.helpers import assert_vjp_matches_finite_differences, max_abs

FORMS = ["recurrent", "chunked", "parallel", "auto"]
FUNCTIONS = {"rwkv6": reflex.rwkv6_attention, "rwkv7": reflex.rwkv7_attention}


def draw(key, seed=0, *, length=9, state=True, batch=2, heads=3, dim=5, value_dim=3):
    module = rwkv6 if key == "rwkv6" else rwkv7
    return module._draw(seed, batch=batch, heads=heads, length=length, dim=dim, value_dim=value_dim, state=state)


def literal_rwkv6(q, k, v, decay, bonus, initial_state=None, scale=1.0):
    """o_t = τ (S_{t−1} + diag(u) k_t v_tᵀ)ᵀ r_t, then S_t = diag(e^{w_t}) S_{t−1} + k_t v_tᵀ."""
    B, H, T, D = q.shape
    out = numpy.zeros((B, H, T, v.shape[-1]))
    final = numpy.zeros((B, H, D, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            s = numpy.zeros((D, v.shape[-1])) if initial_state is None else initial_state[b, h].copy()
            for t in range(T):
                kv = numpy.outer(k[b, h, t], v[b, h, t])
                out[b, h, t] = scale * (s + bonus[h][:, None] * kv).T @ q[b, h, t]
                s = numpy.exp(decay[b, h, t])[:, None] * s + kv
            final[b, h] = s
    return out, final


def literal_rwkv7(q, k, v, decay, a, b, initial_state=None, scale=1.0):
    """RWKV-7's own convention, state 𝒮 (E, D): 𝒮_t = 𝒮_{t−1}(diag(w_t) + a_t b_tᵀ) + v_t k_tᵀ with the
    multiplier w_t = e^{decay}, o_t = τ 𝒮_t r_t; returns the final state transposed to (D, E)."""
    B, H, T, D = q.shape
    E = v.shape[-1]
    out = numpy.zeros((B, H, T, E))
    final = numpy.zeros((B, H, D, E))
    for n in range(B):
        for h in range(H):
            s = numpy.zeros((E, D)) if initial_state is None else initial_state[n, h].T.copy()
            for t in range(T):
                w = numpy.exp(decay[n, h, t])
                s = s @ (numpy.diag(w) + numpy.outer(a[n, h, t], b[n, h, t])) + numpy.outer(v[n, h, t], k[n, h, t])
                out[n, h, t] = scale * s @ q[n, h, t]
            final[n, h] = s.T
    return out, final


LITERAL = {"rwkv6": literal_rwkv6, "rwkv7": literal_rwkv7}


def run(key, host, backend=None, **params):
    move = backend.asarray if backend is not None else (lambda x: x)
    rest = {n: move(x) for n, x in host.items() if n not in ("q", "k", "v")}
    return FUNCTIONS[key](move(host["q"]), move(host["k"]), move(host["v"]), return_state=True, **rest, **params)


@pytest.mark.parametrize("key", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("state", [False, True])
def test_matches_literal_loop_on_every_backend(backend, key, form, state):
    host = draw(key, 1, state=state)
    out, final = run(key, host, backend, form=form, chunk_size=4, scale=0.8)
    want, want_final = LITERAL[key](**host, scale=0.8)
    got = backend.to_numpy(out)
    assert got.dtype == numpy.float64 and got.shape == (2, 3, 9, 3)
    assert max_abs(got, want) <= 1e-13 and max_abs(backend.to_numpy(final), want_final) <= 1e-13


def test_rwkv6_scale_default_is_one_and_fla_scale_differs():
    host = draw("rwkv6", 2)
    default, _ = run("rwkv6", host)
    fla, _ = run("rwkv6", host, scale=5 ** -0.5)
    assert max_abs(default, literal_rwkv6(**host, scale=1.0)[0]) <= 1e-13
    assert max_abs(fla, default * 5 ** -0.5) <= 1e-13 and max_abs(fla, default) > 0.1


def test_rwkv6_zero_bonus_is_gla_read_one_step_late():
    """With u = 0, rwkv6's o_t is GLA's read of S_{t−1}: gated linear_recurrent on shifted queries."""
    host = draw("rwkv6", 3, state=False)
    host["bonus"] = numpy.zeros_like(host["bonus"])
    out, _ = run("rwkv6", host)
    q, k, v, w = host["q"], host["k"], host["v"], host["decay"]
    gla = reflex.linear_recurrent_attention(q[..., 1:, :], k[..., :-1, :], v[..., :-1, :], update_rule="gated",
                                            decay=w[..., :-1, :], scale=1.0)
    assert not numpy.any(out[..., 0, :])
    assert max_abs(out[..., 1:, :], gla) <= 1e-13


@pytest.mark.parametrize("gated", [False, True])
def test_rwkv7_is_the_delta_rule(gated):
    """w = g (scalar per head, broadcast), a = −e^g k, b = βk, values βv: Gated DeltaNet; g = 0: DeltaNet."""
    base = reflex.get("linear_recurrent").cases("tiny", 4)
    case = next(c for c in base if c.params["update_rule"] == ("gated_delta" if gated else "delta"))
    q, k, v, beta = (case.inputs[n] for n in ("q", "k", "v", "beta"))
    q = q[:, ::2]  # one query head per kv head (rwkv7 has no GQA)
    g = case.inputs["decay"] if gated else numpy.zeros(beta.shape)
    gk = numpy.broadcast_to(g[..., None], k.shape)
    state = case.inputs.get("initial_state")
    want = reflex.linear_recurrent_attention(q, k, v, update_rule="gated_delta" if gated else "delta", beta=beta,
                                             scale=0.5, initial_state=state, return_state=True,
                                             **({"decay": g} if gated else {}))
    got = reflex.rwkv7_attention(q, k, beta[..., None] * v, decay=numpy.array(gk), a=-numpy.exp(gk) * k,
                                 b=beta[..., None] * k, scale=0.5, initial_state=state, return_state=True)
    assert max_abs(got[0], want[0]) <= 1e-13 and max_abs(got[1], want[1]) <= 1e-13


@pytest.mark.parametrize("key", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize("length,chunk", [(1, 1), (13, 1), (13, 4), (13, 64)])
def test_forms_agree_and_strong_decay(key, length, chunk):
    host = draw(key, 4, length=length)
    for strong in (False, True):
        if strong:
            host["decay"] = numpy.full(host["decay"].shape, -50.0)
        runs = []
        with numpy.errstate(over="raise", invalid="raise"):
            runs = [run(key, host, form=form, chunk_size=chunk) for form in FORMS]
        for out, final in runs:
            assert numpy.all(numpy.isfinite(out))
            assert max_abs(out, runs[0][0]) <= 1e-12 and max_abs(final, runs[0][1]) <= 1e-12


@pytest.mark.parametrize("key", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize("form", ["recurrent", "chunked", "auto"])
def test_two_halves_with_the_state_carried_equal_one_run(key, form):
    host = draw(key, 5, length=12)
    full, full_state = run(key, host, form=form, chunk_size=5)

    def part(sl, state):
        sliced = {n: (x[..., sl, :] if n not in ("bonus", "initial_state") else x) for n, x in host.items()}
        sliced["initial_state"] = state
        return run(key, sliced, form=form, chunk_size=5)

    first, mid = part(slice(0, 7), host["initial_state"])
    second, last = part(slice(7, 12), mid)
    assert max_abs(numpy.concatenate([first, second], axis=-2), full) <= 1e-13
    assert max_abs(last, full_state) <= 1e-13


@pytest.mark.parametrize("key", ["rwkv6", "rwkv7"])
def test_numba_scan_equals_array_api_path(key):
    import array_api_strict

    host = draw(key, 6, length=10)
    out, final = run(key, host)  # plain NumPy float64, auto: Numba
    strict = {n: array_api_strict.asarray(x) for n, x in host.items()}
    s_out, s_final = run(key, strict, form="recurrent")
    assert max_abs(out, numpy.asarray(s_out)) <= 1e-13 and max_abs(final, numpy.asarray(s_final)) <= 1e-13


@pytest.mark.parametrize("key", ["rwkv6", "rwkv7"])
def test_errors(key):
    host = draw(key, 7)
    with pytest.raises(ValueError, match="decay holds log multipliers"):
        run(key, {**host, "decay": numpy.exp(host["decay"])})
    with pytest.raises(ValueError, match=r"decay must have shape \(..., H, T, D\)"):
        run(key, {**host, "decay": host["decay"][..., 0]})
    with pytest.raises(ValueError, match="one key/value head per head"):
        run(key, {**host, "q": numpy.concatenate([host["q"], host["q"]], axis=1)})
    with pytest.raises(ValueError, match=r"initial_state must have shape"):
        run(key, {**host, "initial_state": host["initial_state"][..., :2]})
    other = ("bonus", r"bonus must have shape \(H, D\)") if key == "rwkv6" else ("a", r"a must have shape")
    with pytest.raises(ValueError, match=other[1]):
        run(key, {**host, other[0]: host[other[0]][..., :2]})


@pytest.mark.parametrize("key", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_vjp_matches_finite_differences(key, form):
    host = draw(key, 8, batch=1, heads=2, length=5, dim=3, value_dim=2)
    d_out = random.normal((1, 2, 5, 2), seed=(8, 1))
    d_state = random.normal((1, 2, 3, 2), seed=(8, 2))
    grads = assert_vjp_matches_finite_differences(key, host, d_out, d_state=d_state,
                                                  params={"form": form, "chunk_size": 2, "scale": 0.7})
    assert set(grads) == set(host)


@pytest.mark.parametrize("key", ["rwkv6", "rwkv7"])
def test_vjp_on_every_backend(backend, key):
    host = draw(key, 9, batch=1, heads=2, length=4, dim=3, value_dim=2)
    d_out = random.normal((1, 2, 4, 2), seed=(9, 1))
    d_state = random.normal((1, 2, 3, 2), seed=(9, 2))
    want = reflex.vjp(key, host, d_out, d_state=d_state)
    got = reflex.vjp(key, {n: backend.asarray(x) for n, x in host.items()}, backend.asarray(d_out),
                     d_state=backend.asarray(d_state))
    for name in host:
        assert max_abs(backend.to_numpy(got[name]), want[name]) <= 1e-13, name


@pytest.mark.parametrize("key", ["rwkv6", "rwkv7"])
def test_vjp_equals_autograd_through_every_form(key):
    from tests.test_linear_recurrent import check_vjp_against_autograd_of_every_form

    host = draw(key, 10, batch=1, heads=2, length=7, dim=3, value_dim=2)
    d_out = random.normal((1, 2, 7, 2), seed=(10, 1))
    d_state = random.normal((1, 2, 3, 2), seed=(10, 2))
    check_vjp_against_autograd_of_every_form(key, host, d_out, d_state, scale=0.7)
