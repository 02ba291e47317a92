"""mamba2_attention: the SSD recurrence written literally, the quadratic SSD form, the gated linear limit,
forms agreeing (strong decay too), state carry, Numba ≡ array API, errors, VJP by central differences."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from reflex.mechanisms.mamba2 import POSITIONAL, _draw
from tests.helpers import FD_RTOL, FD_STEP, max_abs

FORMS = ["recurrent", "chunked", "parallel", "auto"]


def draw(seed=0, *, groups=2, heads=4, length=9, skip=True, state=True, batch=2):
    return _draw(seed, batch=batch, heads=heads, groups=groups, length=length, state_size=5, head_dim=3, skip=skip,
                 state=state)


def split(host):
    return [host[n] for n in POSITIONAL], {n: x for n, x in host.items() if n not in POSITIONAL}


def literal(x, dt, A, B, C, D=None, initial_state=None):
    """h_t = e^{Δ_t A_h} h_{t−1} + Δ_t B_t x_tᵀ, y_t = h_tᵀ C_t + D_h x_t, head h in group h // (H/G)."""
    batch, H, T, P = x.shape
    G, N = B.shape[1], B.shape[-1]
    y = numpy.zeros_like(x)
    final = numpy.zeros((batch, H, N, P))
    for b in range(batch):
        for h in range(H):
            g = h // (H // G)
            s = numpy.zeros((N, P)) if initial_state is None else initial_state[b, h].copy()
            for t in range(T):
                s = numpy.exp(dt[b, h, t] * A[h]) * s + dt[b, h, t] * numpy.outer(B[b, g, t], x[b, h, t])
                y[b, h, t] = s.T @ C[b, g, t] + (0.0 if D is None else D[h] * x[b, h, t])
            final[b, h] = s
    return y, final


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_matches_literal_recurrence_on_every_backend(backend, form, groups):
    host = draw(1, groups=groups)
    arrays, rest = split(host)
    y, state = reflex.mamba2_attention(*(backend.asarray(a) for a in arrays), form=form, chunk_size=4,
                                       return_state=True, **{n: backend.asarray(a) for n, a in rest.items()})
    want_y, want_state = literal(*arrays, **rest)
    got = backend.to_numpy(y)
    assert got.dtype == numpy.float64 and got.shape == (2, 4, 9, 3)
    assert max_abs(got, want_y) <= 1e-13 and max_abs(backend.to_numpy(state), want_state) <= 1e-13


def test_quadratic_ssd_form():
    """Y = ((C Bᵀ) ∘ L)(Δx) + D x with L_ij = exp(Σ_{j<s≤i} Δ_s A)[i ≥ j] (Dao & Gu 2024 §4–5)."""
    host = draw(2, groups=1, state=False)
    x, dt, A, B, C = (host[n] for n in POSITIONAL)
    T = x.shape[-2]
    cum = numpy.cumsum(dt * A[:, None], axis=-1)  # (b, H, T)
    seg = cum[..., :, None] - cum[..., None, :]
    mask = numpy.tri(T, dtype=bool)
    L = numpy.where(mask, numpy.exp(numpy.where(mask, seg, 0.0)), 0.0)
    want = ((C @ numpy.swapaxes(B, -1, -2)) * L) @ (dt[..., None] * x) + host["D"][:, None, None] * x
    for form in FORMS:
        assert max_abs(reflex.mamba2_attention(x, dt, A, B, C, D=host["D"], form=form), want) <= 1e-13


@pytest.mark.parametrize("groups", [1, 2])
def test_is_gated_linear_recurrent_with_q_c_k_b_v_dt_x(groups):
    """mamba2 ≡ linear_recurrent(update_rule='gated', q=C, k=B, v=Δx, decay=ΔA, scale=1) + D x."""
    host = draw(3, groups=groups)
    x, dt, A, B, C = (host[n] for n in POSITIONAL)
    H = x.shape[1]
    rep = H // groups
    got, state = reflex.mamba2_attention(x, dt, A, B, C, D=host["D"], initial_state=host["initial_state"],
                                         return_state=True)
    want, want_state = reflex.linear_recurrent_attention(
        numpy.repeat(C, rep, axis=1), numpy.repeat(B, rep, axis=1), dt[..., None] * x, update_rule="gated",
        decay=dt * A[:, None], scale=1.0, initial_state=host["initial_state"], return_state=True, form="recurrent")
    assert max_abs(got, want + host["D"][:, None, None] * x) <= 1e-13
    assert max_abs(state, want_state) <= 1e-13


@pytest.mark.parametrize("length,chunk", [(1, 1), (13, 1), (13, 4), (13, 64), (16, 8)])
def test_forms_agree_and_strong_decay(length, chunk):
    host = draw(4, length=length)
    for strong in (False, True):
        if strong:
            host["dt"] = numpy.full(host["dt"].shape, 50.0)
            host["A"] = -numpy.ones_like(host["A"])  # Δ·A = −50 per step
        arrays, rest = split(host)
        runs = []
        with numpy.errstate(over="raise", invalid="raise"):
            for form in FORMS:
                runs.append(reflex.mamba2_attention(*arrays, form=form, chunk_size=chunk, return_state=True, **rest))
        for y, state in runs:
            assert numpy.all(numpy.isfinite(y))
            assert max_abs(y, runs[0][0]) <= 1e-12 and max_abs(state, runs[0][1]) <= 1e-12


@pytest.mark.parametrize("form", ["recurrent", "chunked", "auto"])
def test_two_halves_with_the_state_carried_equal_one_run(form):
    host = draw(5, length=12)
    arrays, rest = split(host)
    full, full_state = reflex.mamba2_attention(*arrays, form=form, chunk_size=5, return_state=True, **rest)
    x, dt, A, B, C = arrays

    def part(sl, state):
        return reflex.mamba2_attention(x[..., sl, :], dt[..., sl], A, B[..., sl, :], C[..., sl, :], D=rest["D"],
                                       initial_state=state, form=form, chunk_size=5, return_state=True)

    first, mid = part(slice(0, 7), rest["initial_state"])
    second, last = part(slice(7, 12), mid)
    assert max_abs(numpy.concatenate([first, second], axis=-2), full) <= 1e-13
    assert max_abs(last, full_state) <= 1e-13


def test_numba_scan_equals_array_api_path():
    import array_api_strict

    host = draw(6, length=10)
    arrays, rest = split(host)
    y, state = reflex.mamba2_attention(*arrays, return_state=True, **rest)  # auto: Numba
    strict = {n: array_api_strict.asarray(a) for n, a in host.items()}
    ys, ss = reflex.mamba2_attention(*(strict[n] for n in POSITIONAL), form="recurrent", return_state=True,
                                     D=strict["D"], initial_state=strict["initial_state"])
    assert max_abs(y, numpy.asarray(ys)) <= 1e-13 and max_abs(state, numpy.asarray(ss)) <= 1e-13


def test_errors():
    host = draw(7)
    x, dt, A, B, C = (host[n] for n in POSITIONAL)
    with pytest.raises(ValueError, match="dt .* must be >= 0"):
        reflex.mamba2_attention(x, -dt, A, B, C)
    with pytest.raises(ValueError, match="A must be <= 0"):
        reflex.mamba2_attention(x, dt, -A, B, C)
    with pytest.raises(ValueError, match=r"C must have shape"):
        reflex.mamba2_attention(x, dt, A, B, C[..., :3])
    with pytest.raises(ValueError, match="not a multiple"):
        reflex.mamba2_attention(x[:, :3], dt[:, :3], A[:3], B, C)
    with pytest.raises(ValueError, match=r"initial_state must have shape \(..., H, N, P\)"):
        reflex.mamba2_attention(x, dt, A, B, C, initial_state=host["initial_state"][..., :2])
    with pytest.raises(ValueError, match=r"D must have shape \(H,\)"):
        reflex.mamba2_attention(x, dt, A, B, C, D=host["D"][:2])
    with pytest.raises(ValueError, match="form must be one of"):
        reflex.mamba2_attention(x, dt, A, B, C, form="quadratic")


def loss(host, d_out, d_state):
    arrays, rest = split(host)
    y, state = reflex.mamba2_attention(*arrays, form="chunked", chunk_size=3, return_state=True, **rest)
    return float(numpy.sum(y * d_out) + numpy.sum(state * d_state))


def test_vjp_matches_central_differences():
    host = draw(8, batch=1, length=5)
    d_out = random.normal((1, 4, 5, 3), seed=(8, 1))
    d_state = random.normal((1, 4, 5, 3), seed=(8, 2))
    grads = reflex.vjp("mamba2", host, d_out, d_state=d_state)
    assert set(grads) == set(host)
    for name, x in host.items():
        numeric = numpy.zeros_like(x)
        for index in numpy.ndindex(x.shape):
            h = FD_STEP * max(1.0, abs(float(x[index])))
            values = []
            for sign in (1.0, -1.0):
                y = x.copy()
                y[index] += sign * h
                values.append(loss({**host, name: y}, d_out, d_state))
            numeric[index] = (values[0] - values[1]) / (2 * h)
        scale = float(numpy.max(numpy.abs(grads[name])))
        assert max_abs(grads[name], numeric) <= FD_RTOL * scale + 1e-10, name


def test_vjp_on_every_backend(backend):
    host = draw(9, batch=1, length=4)
    d_out = random.normal((1, 4, 4, 3), seed=(9, 1))
    want = reflex.vjp("mamba2", host, d_out)
    got = reflex.vjp("mamba2", {n: backend.asarray(x) for n, x in host.items()}, backend.asarray(d_out))
    for name in host:
        assert max_abs(backend.to_numpy(got[name]), want[name]) <= 1e-13, name


def test_vjp_equals_autograd_through_every_form():
    from tests.test_linear_recurrent import check_vjp_against_autograd_of_every_form

    host = draw(10, batch=1, length=7)
    d_out = random.normal((1, 4, 7, 3), seed=(10, 1))
    d_state = random.normal((1, 4, 5, 3), seed=(10, 2))
    check_vjp_against_autograd_of_every_form("mamba2", host, d_out, d_state, positional=POSITIONAL)
