"""Random Feature Attention (RFA): random Fourier features, with an optional recency gate."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, standard
from reflex.mechanisms.linear import _kernelized, causal_shift, check_form, check_gate, grouped, safe_divide
from reflex.mechanisms.performer import check_projection
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import Real, typed_options
from reflex.mechanisms._numerics import vector_norm

__all__ = ["rfa_attention"]


@typed_options(scale=Real(positive=True, optional=True))  # the features use sqrt(scale)
def rfa_attention(q: Any, k: Any, v: Any, /, *, projection: Any = None, num_features: int | None = None,
                  seed: Any = None, gate: Any = None, causal: bool | str = False, normalize: bool = True,
                  scale: float | None = None, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Random Feature Attention: sin/cos random Fourier features of ℓ2-normalised q, k; optional gate.

    .. math::

        \\phi(x) = \\tfrac{1}{\\sqrt m}\\,[\\sin(\\omega^\\top x),\\, \\cos(\\omega^\\top x)],\\qquad
        o_i = \\frac{\\phi(x_i)^\\top S_{t_i}}{\\phi(x_i)^\\top z_{t_i}},

        S_t = g_t S_{t-1} + (1 - g_t)\\,\\phi(y_t) v_t^\\top,\\quad
        z_t = g_t z_{t-1} + (1 - g_t)\\,\\phi(y_t)

    with ``x = √s·q/‖q‖``, ``y = √s·k/‖k‖`` (Peng et al. 2021, "Random Feature Attention", §2.2
    eq. 3–5 (features), §3.1 (RFA, ℓ2-normalised q and k), §3.2 eq. 7 (the gate)). Without a gate
    ``g = 1`` and the update is ``S_t = S_{t−1} + φ(y_t)v_tᵀ``. As m → ∞,
    ``φ(x)·φ(y) → exp(−‖x − y‖²/2) = e^{−s}·exp(s q̂·k̂)``, so ungated RFA approaches
    ``full_attention(q̂, k̂, v, scale=s)``.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``.

    Args:
        projection: ``ω (m, D)``; or ``num_features`` m (default round(D ln D)) and ``seed``, drawing
            i.i.d. N(0, 1) entries with :func:`reflex.random.normal` (the paper's ω ~ N(0, σ²I) is
            ``projection/σ``, equivalently ``scale = 1/σ²``).
        gate: ``(..., G, S)`` values in [0, 1], the recency gate g_t of each key (the paper computes
            it as sigmoid(w·x_t + b) of the layer input); causal only.
        causal: ``False``; ``True``/``"top_left"`` or ``"bottom_right"``.
        normalize: ℓ2-normalise q and k first (the paper's RFA; a zero vector stays zero).
        scale: s, the softmax temperature approximated; default 1/√D.
        implementation: ``"parallel"`` (= ``"auto"``: prefix sums; a gated prefix is a log-depth
            scan), ``"recurrent"`` (the RNN above, one key at a time) or ``"quadratic"``.

    Trigonometric features can make the denominator negative or 0 (a known weakness of RFA); it is
    not clipped. An exactly-zero denominator (a query that attends nothing) outputs 0.
    """
    form = check_form(implementation)
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    offset = causal_shift(p, causal)
    if gate is not None:
        if offset is None:
            raise ValueError("gate needs causal=True/'top_left'/'bottom_right': the recency gate orders the keys")
        gate = check_gate(p, gate)
    omega_t = xp.matrix_transpose(check_projection(p, projection, num_features, seed, orthogonal=False))
    ratio = 1.0 / math.sqrt(int(omega_t.shape[-1]))
    root = math.sqrt(_kernels.resolve_scale(scale, p.dim))
    qg, kg, _ = grouped(p)

    def features(x: Any) -> Any:
        if normalize:
            norm = vector_norm(xp, x)
            x = x / xp.where(norm == 0, 1.0, norm)
        u = (root * x) @ omega_t
        return ratio * xp.concat([xp.sin(u), xp.cos(u)], axis=-1)

    return _kernelized(p, lambda i0, i1: features(qg[..., i0:i1, :]), lambda j0, j1: features(kg[..., j0:j1, :]),
                       safe_divide(xp), offset=offset, form=form, gate=gate)


def _rfa_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, num_features: int | None = None, seed: Any = None,
             causal: bool | str = False, normalize: bool = True, scale: float | None = None, compute_dtype: Any = None,
             implementation: str = "auto") -> dict:
    """VJP of :func:`rfa_attention`: ``dq``, ``dk``, ``dv``, and ``d projection``, ``d gate`` when given.

    The kernelised core's backward gives ``dφ``, ``dv`` and, gated, ``dg_t = ⟨Λ_t, S_{t−1} − φ(y_t)v_tᵀ⟩ +
    ⟨λ_t, z_{t−1} − φ(y_t)⟩`` (Λ, λ the state adjoints, a reversed scan with factors ``g_{t+1}``; see
    :func:`reflex.mechanisms._grad.kernelized_vjp`). Features ``φ = [a_s, a_c] = [sin u, cos u]/√m``,
    ``u = ωᵀ(√s x̂)``, ``dφ = [b_s, b_c]``: ``du = b_s ∘ a_c − b_c ∘ a_s``, ``dx̂ = √s ω du``,
    ``dω = Σ √s x̂ duᵀ``; normalisation ``x̂ = x/‖x‖``: ``dx = (dx̂ − x̂ ⟨x̂, dx̂⟩)/‖x‖`` (a zero vector,
    which the forward passes through unchanged, gets ``dx = dx̂``).
    """
    from reflex.mechanisms import _grad

    form = check_form(implementation)
    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = p.xp
    offset = causal_shift(p, causal)
    gate = inputs.get("gate")
    if gate is not None:
        if offset is None:
            raise ValueError("gate needs causal=True/'top_left'/'bottom_right': the recency gate orders the keys")
        gate = check_gate(p, gate)
    omega_t = xp.matrix_transpose(check_projection(p, inputs.get("projection"), num_features, seed, orthogonal=False))
    m = int(omega_t.shape[-1])
    ratio = 1.0 / math.sqrt(m)
    root = math.sqrt(_kernels.resolve_scale(scale, p.dim))
    qg, kg, _ = grouped(p)

    def unit(x: Any) -> tuple[Any, Any]:
        if not normalize:
            return x, None
        norm = vector_norm(xp, x)
        norm = xp.where(norm == 0, 1.0, norm)
        return x / norm, norm

    (xq, nq), (xk, nk) = unit(qg), unit(kg)

    def features(x: Any) -> Any:
        u = (root * x) @ omega_t
        return ratio * xp.concat([xp.sin(u), xp.cos(u)], axis=-1)

    fq, fk = features(xq), features(xk)
    d_fq, d_fk, d_v, d_gate = _grad.kernelized_vjp(p, fq, fk, _grad.divide_vjp(xp), d_out, offset=offset, form=form,
                                                   gate=gate)

    def back(x: Any, norm: Any, f: Any, d_f: Any) -> tuple[Any, Any]:
        du = d_f[..., :m] * f[..., m:] - d_f[..., m:] * f[..., :m]
        d_unit = root * (du @ xp.matrix_transpose(omega_t))
        d_x = d_unit if norm is None else (d_unit - x * xp.sum(x * d_unit, axis=-1, keepdims=True)) / norm
        return d_x, _grad.sum_to_matrix(xp, xp.matrix_transpose(root * x) @ du)

    (d_q, dw_q), (d_k, dw_k) = back(xq, nq, fq, d_fq), back(xk, nk, fk, d_fk)
    grads = {"q": _grad.ungroup(p, d_q), "k": d_k[..., 0, :, :], "v": d_v}
    if "projection" in inputs:
        grads["projection"] = xp.matrix_transpose(dw_q + dw_k)
    if gate is not None:
        grads["gate"] = d_gate
    return grads


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    inputs = {**gqa, "projection": random.normal((4 * d["D"], d["D"]), seed=(seed, 5))}
    gate = random.uniform((2, d["G"], d["S"]), seed=(seed, 6), low=0.5, high=1.0)
    return [
        Case("gqa", inputs, {}, seed=seed),
        Case("causal", inputs, {"causal": True}, seed=seed),
        Case("gated", {**inputs, "gate": gate}, {"causal": "bottom_right"}, seed=seed),
        Case("gated_recurrent", {**inputs, "gate": gate}, {"causal": True, "implementation": "recurrent"}, seed=seed),
    ]


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """The materialised ``(L, S)`` feature-kernel matrix (gate weights by cumulative products)."""
    return rfa_attention(q, k, v, **{**params, "implementation": "quadratic"})


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", example_qkv(seq, heads, dim, seed), {"num_features": 256, "seed": seed}, seed=seed)


register(Mechanism(
    key="rfa",
    function=rfa_attention,
    family="D. linearized",
    paper="Peng et al. 2021, 'Random Feature Attention', §2.2, §3.1-3.2",
    params={
        "projection": "omega (m, D), explicit",
        "num_features": "m when drawing omega from seed (default round(D ln D))",
        "seed": "draws omega with reflex.random.normal",
        "gate": "(..., G, S) recency gate in [0, 1] (causal only)",
        "causal": "False | True | 'top_left' | 'bottom_right'",
        "normalize": "l2-normalise q and k (default True)",
        "scale": "temperature s, default 1/sqrt(D)",
        "implementation": "'parallel' | 'recurrent' | 'quadratic'",
    },
    cases=_cases,
    reference=_reference,
    example=_example,
    vjp=_rfa_vjp,
))
