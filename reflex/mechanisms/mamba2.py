"""Mamba-2's state space duality (SSD) layer: a scalar-gated linear recurrence with grouped B, C and a D skip."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace, numpy_namespace
from reflex.mechanisms import _recurrent
from reflex.mechanisms._inputs import check_array, resolve_dtype
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._patterns import check_positive_int
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._numerics import unbroadcast

__all__ = ["mamba2_attention"]


def _check_inputs(x: Any, dt: Any, A: Any, B: Any, C: Any, D: Any, initial_state: Any, form: Any, chunk_size: Any,
                  compute_dtype: Any) -> tuple[Any, ...]:
    """``(xp, terms, state, cast arrays, sizes)``: Mamba-2 as the core with q = C, k = B, v = Δ·x, g = Δ·A."""
    _recurrent.check_form(form)
    check_positive_int("chunk_size", chunk_size)
    xp = namespace(x, dt, A, B, C)
    dev = device_of(x)
    dtype = resolve_dtype(xp, compute_dtype)
    x = check_array(xp, dev, dtype, "x", x, against="x")
    if x.ndim < 3:
        raise ValueError(f"x must have shape (..., H, T, P) with at least 3 axes; got {_recurrent.shape_of(x)}")
    *batch, H, T, P = _recurrent.shape_of(x)
    batch = tuple(batch)
    dt = check_array(xp, dev, dtype, "dt", dt, against="x")
    _recurrent.check_shape("dt", dt, (*batch, H, T), "(..., H, T)")
    if T and not bool(xp.all(dt >= 0.0)):
        raise ValueError(f"dt (Δ, after softplus) must be >= 0; got a minimum of {float(xp.min(dt))}")
    A = check_array(xp, dev, dtype, "A", A, against="x")
    _recurrent.check_shape("A", A, (H,), "(H,)")
    if H and not bool(xp.all(A <= 0.0)):
        raise ValueError(f"A must be <= 0 (A = -exp(A_log); the decay e^(Δ·A) must not grow); got a maximum of "
                         f"{float(xp.max(A))}")
    B = check_array(xp, dev, dtype, "B", B, against="x")
    C = check_array(xp, dev, dtype, "C", C, against="x")
    if B.ndim != x.ndim:
        raise ValueError(f"B must have shape (..., G, T, N) with the batch axes of x {batch}; got {_recurrent.shape_of(B)}")
    G, N = int(B.shape[-3]), int(B.shape[-1])
    _recurrent.check_shape("B", B, (*batch, G, T, N), "(..., G, T, N)")
    _recurrent.check_shape("C", C, (*batch, G, T, N), "(..., G, T, N) like B")
    if G == 0 or H % G:
        raise ValueError(f"B and C have {G} groups; x has {H} heads, which is not a multiple")
    if D is not None:
        D = check_array(xp, dev, dtype, "D", D, against="x")
        _recurrent.check_shape("D", D, (H,), "(H,)")
    state = _recurrent.initial_state(xp, dev, dtype, initial_state, (*batch, H, N, P), "(..., H, N, P)")

    def per_head(y: Any) -> Any:  # (..., G, T, N) → (..., H, 1, T, N): head h reads group h // (H/G)
        y = xp.broadcast_to(xp.expand_dims(y, axis=-3), (*batch, G, H // G, T, N))
        return xp.expand_dims(xp.reshape(y, (*batch, H, T, N)), axis=-3)

    terms = _recurrent.Terms(xp=xp, device=dev, q=per_head(C), k=per_head(B),
                             v=xp.expand_dims(dt[..., None] * x, axis=-3),
                             decay=xp.expand_dims((dt * A[:, None])[..., None], axis=-3))
    return xp, terms, state, (x, dt, A, B, C, D), (batch, H, G, T, N, P)


@typed_options()
def mamba2_attention(x: Any, dt: Any, A: Any, B: Any, C: Any, /, *, D: Any = None, initial_state: Any = None,
                     return_state: bool = False, form: str = "auto", chunk_size: int = 64,
                     compute_dtype: Any = None) -> Any:
    """Mamba-2 SSD: h_t = e^{Δ_t A_h} h_{t−1} + Δ_t B_t x_tᵀ, y_t = h_tᵀ C_t + D_h x_t.

    .. math::

        h_t = e^{\\Delta_t A_h}\\, h_{t-1} + \\Delta_t\\, B_t x_t^\\top \\in \\mathbb{R}^{N\\times P},\\qquad
        y_t = h_t^\\top C_t + D_h\\, x_t

    (Dao & Gu 2024, "Transformers are SSMs", §3–§6: the scalar-identity SSM, its quadratic (SSD)
    dual form, and the chunked algorithm of §6 built on segment sums). It is simple gated linear
    attention with ``q = C``, ``k = B``, ``v = Δ·x``, log decay ``g = Δ·A``, no scale (τ = 1) plus the
    D skip: ``reflex.linear_recurrent_attention`` with ``update_rule="gated"`` gives the same numbers.

    Shapes (T tokens, H heads, G groups of B/C, N state size, P head dim): ``x (..., H, T, P)``,
    ``dt (..., H, T)`` (Δ ≥ 0, *after* the caller's ``softplus(Δ_raw + dt_bias)``),
    ``A (H,)`` ≤ 0 (``−exp(A_log)``), ``B, C (..., G, T, N)`` with head h reading group
    ``h // (H/G)``, ``D (H,)`` optional, state ``(..., H, N, P)`` (zeros if None) → ``y (..., H, T, P)``.
    The reference implementation's layout is (batch, T, H, P) for x and (batch, T, G, N) for B, C.

    Args:
        D: the skip ``D_h x_t`` (absent: no skip).
        initial_state: ``h_0 (..., H, N, P)``.
        return_state: also return ``h_T (..., H, N, P)``.
        form: ``"recurrent"``, ``"chunked"`` (segment sums ``Σ_{j<s≤i} Δ_s A`` summed directly, never
            differenced; the exponent is never positive), ``"parallel"`` (the quadratic SSD form,
            ``((C Bᵀ) ∘ L) (Δx)`` with ``L_ij = e^{Σ_{j<s≤i} Δ_s A}``) or ``"auto"`` (the Numba scan for
            plain NumPy float64, chunked otherwise); they agree to round-off.
        chunk_size: chunk length of ``"chunked"``, any int ≥ 1.
        compute_dtype: arithmetic dtype (default float64).

    Raises:
        ValueError: dt < 0, A > 0, shape mismatches (named), H not a multiple of G.
    """
    xp, terms, state, arrays, (batch, H, G, T, N, P) = _check_inputs(x, dt, A, B, C, D, initial_state, form,
                                                                      chunk_size, compute_dtype)
    out, state = _recurrent.run(terms, state, scale=1.0, form=form, chunk_size=chunk_size)
    y = out[..., 0, :, :]
    x_cast, D_cast = arrays[0], arrays[5]
    if D_cast is not None:
        y = y + D_cast[:, None, None] * x_cast
    return (y, state[..., 0, :, :]) if return_state else y


def _vjp(inputs: dict[str, Any], d_out: Any, *, d_lse: Any = None, d_state: Any = None, return_state: bool = False,
         form: str = "auto", chunk_size: int = 64, compute_dtype: Any = None) -> dict[str, Any]:
    """Reverse-time scan of the core, then ``dx = Δ·dv + D·dy``, ``dΔ = Σ_p x·dv + A·dg``,
    ``dA_h = Σ Δ·dg``, ``dB``/``dC`` summed over the heads of a group, ``dD_h = Σ dy·x``."""
    del d_lse, return_state
    xp, terms, state, (x, dt, A, B, C, D), (batch, H, G, T, N, P) = _check_inputs(
        inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], inputs.get("D"),
        inputs.get("initial_state"), form, chunk_size, compute_dtype)
    dtype = x.dtype
    d_out = xp.astype(d_out, dtype)
    if d_state is not None:
        d_state = xp.expand_dims(xp.astype(d_state, dtype), axis=-3)
    grads = _recurrent.vjp_terms(terms, state, xp.expand_dims(d_out, axis=-3), d_state, scale=1.0)
    dv, dg = grads["v"][..., 0, :, :], grads["decay"][..., 0, :, 0]  # (..., H, T, P), (..., H, T)

    def per_group(y: Any) -> Any:  # (..., H, 1, T, N) → (..., G, T, N), summed over the heads of a group
        return xp.sum(xp.reshape(y[..., 0, :, :], (*batch, G, H // G, T, N)), axis=-3)

    result = {
        "x": dt[..., None] * dv + (D[:, None, None] * d_out if D is not None else 0.0),
        "dt": xp.sum(x * dv, axis=-1) + A[:, None] * dg,
        "A": unbroadcast(xp, xp.sum(dt * dg, axis=-1), (H,)),
        "B": per_group(grads["k"]), "C": per_group(grads["q"]),
    }
    if D is not None:
        result["D"] = unbroadcast(xp, xp.sum(xp.sum(d_out * x, axis=-1), axis=-1), (H,))
    if inputs.get("initial_state") is not None:
        result["initial_state"] = grads["state"][..., 0, :, :]
    return result


def _draw(seed: int, *, batch: int, heads: int, groups: int, length: int, state_size: int, head_dim: int,
          skip: bool, state: bool) -> dict[str, Any]:
    """Host inputs: x, B, C ~ N(0, 1); Δ = softplus(N(0, 1) − 1); A = −exp(U(−1, 1)); D, h_0 ~ N(0, 1)."""
    host = numpy_namespace()
    raw = random.normal((batch, heads, length), seed=(seed, 1)) - 1.0
    inputs = {
        "x": random.normal((batch, heads, length, head_dim), seed=(seed, 0)),
        "dt": host.maximum(raw, 0.0) + host.log1p(host.exp(-host.abs(raw))),
        "A": -host.exp(random.uniform((heads,), seed=(seed, 2), low=-1.0, high=1.0)),
        "B": random.normal((batch, groups, length, state_size), seed=(seed, 3)),
        "C": random.normal((batch, groups, length, state_size), seed=(seed, 4)),
    }
    if skip:
        inputs["D"] = random.normal((heads,), seed=(seed, 5))
    if state:
        inputs["initial_state"] = random.normal((batch, heads, state_size, head_dim), seed=(seed, 6))
    return inputs


POSITIONAL = ("x", "dt", "A", "B", "C")


def _cases(size: str, seed: int) -> list[Case]:
    from reflex.mechanisms._cases import dims

    d = dims(size)
    shape = dict(batch=2, heads=d["H"], groups=d["G"], length=d["L"], state_size=d["D"], head_dim=d["E"])
    return [
        Case("grouped", _draw(seed, skip=False, state=False, **shape), {"form": "chunked", "chunk_size": 3},
             positional=POSITIONAL, seed=seed),
        Case("skip_state", _draw(seed, skip=True, state=True, **shape), {"form": "chunked", "chunk_size": 5},
             positional=POSITIONAL, seed=seed),
        Case("one_group_recurrent", _draw(seed, skip=True, state=False, **{**shape, "groups": 1}),
             {"form": "recurrent"}, positional=POSITIONAL, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    inputs = _draw(seed, batch=1, heads=heads, groups=1, length=seq, state_size=dim, head_dim=dim, skip=True,
                   state=False)
    return Case("example", inputs, {}, positional=POSITIONAL, seed=seed)


def _reference(*arrays: Any, **params: Any) -> Any:
    """The token-by-token recurrence (array-API path)."""
    return mamba2_attention(*arrays, **{**params, "form": "recurrent"})


register(Mechanism(
    key="mamba2",
    function=mamba2_attention,
    family="K. state-recurrent linear",
    paper="Dao & Gu 2024, 'Transformers are SSMs: Generalized Models and Efficient Algorithms Through "
          "Structured State Space Duality', §3-§6 (SSD, segment sums)",
    params={
        "D": "(H,) skip, optional",
        "initial_state": "(..., H, N, P), zeros if None",
        "return_state": "also return the final state (..., H, N, P)",
        "form": "'recurrent' | 'chunked' (segment sums) | 'parallel' (quadratic SSD) | 'auto'",
        "chunk_size": "chunk length of 'chunked' (any int >= 1)",
    },
    cases=_cases,
    reference=_reference,
    row_separable=False,
    example=_example,
    vjp=_vjp,
    returns_state=True,
))
