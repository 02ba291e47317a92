"""Capsule routing over heads: head outputs as input capsules, aggregated by dynamic or EM routing."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms._cases import dims
from reflex.mechanisms._kernels import resolve_dtype
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["capsule_routing_attention"]

VARIANTS = ("dynamic", "em")


def _routing_softmax(xp: Any, z: Any) -> Any:
    """Softmax over the output-capsule axis (last): routing coefficients, not attention weights."""
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def _squash(xp: Any, s: Any) -> Any:
    """squash(s) = ‖s‖²/(1 + ‖s‖²)·s/‖s‖, written s·‖s‖/(1 + ‖s‖²) so that squash(0) = 0."""
    sq = xp.sum(s * s, axis=-1, keepdims=True)
    return s * xp.sqrt(sq) / (1.0 + sq)


@typed_options()
def capsule_routing_attention(heads_out: Any, transforms: Any, /, *, iterations: int = 3, variant: str = "dynamic",
                              activations: Any = None, beta_a: float = 0.0, beta_v: float = 0.0,
                              inverse_temperature: float = 1.0, eps: float = 1e-9, return_coefficients: bool = False,
                              compute_dtype: Any = None) -> Any:
    """Aggregate multi-head outputs by routing-by-agreement: H input capsules → M output capsules per position.

    .. math::

        \\hat u_{m|h} = o_h W_{hm};\\quad \\text{dynamic: } c_{h\\cdot} = \\mathrm{softmax}_m(b_{h\\cdot}),\\;
        s_m = \\sum_h c_{hm} \\hat u_{m|h},\\; v_m = \\frac{\\|s_m\\|^2}{1 + \\|s_m\\|^2}\\frac{s_m}{\\|s_m\\|},\\;
        b_{hm} \\mathrel{+}= \\hat u_{m|h}\\cdot v_m

    Takes head outputs and transforms, not q, k, v. Shapes: ``heads_out`` O ``(..., H, L, E)`` (the
    output of any attention mechanism before the concat), ``transforms`` W ``(H, M, E, F)`` →
    ``out (..., L, M·F)``, the output capsules concatenated in order m = 0 … M−1. With
    ``return_coefficients`` also the routing coefficients ``(..., L, H, M)``: each input capsule's
    coefficients sum to 1 over m.

    Variants (``iterations`` T ≥ 1 rounds):
    - ``"dynamic"`` (Sabour et al. 2017, as used by Gu & Feng 2019 and Li et al. 2019): b starts at
      0, so T = 1 is the uniform aggregation v_m = squash((1/M)·Σ_h û_{m|h}); the output capsules are
      v_m; logits are updated after every round but the last.
    - ``"em"`` (Hinton et al. 2018, as Li et al. 2019 §3.3): R starts uniform (1/M); M-step with input
      activations a_h (``activations (..., H, L)``, default 1): R' = R·a,
      μ_m = Σ_h R' û / Σ_h R', σ²_m = Σ_h R'(û − μ_m)² / Σ_h R' + ``eps`` (per dimension),
      cost_m = Σ_f (β_v + ½ log σ²_mf)·Σ_h R'_hm, a_m = sigmoid(λ(β_a − cost_m)); E-step (every round
      but the last) R_hm = softmax_m(log a_m + log N(û_{m|h}; μ_m, σ²_m)). The output capsules are
      the poses μ_m; T = 1 is the a-weighted mean of the votes. λ = ``inverse_temperature`` is fixed
      (the paper's schedule is the caller's), ``eps`` is the variance floor.

    Reference: Gu & Feng 2019, "Improving Multi-head Attention with Capsule Networks", NLPCC, §3;
    Li et al. 2019, "Information Aggregation for Multi-Head Attention with Routing-by-Agreement",
    NAACL, §3.2–3.3; Sabour et al. 2017 (Procedure 1); Hinton et al. 2018 (EM routing, Procedure 1).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1; got {iterations!r}")
    for name, value in (("beta_a", beta_a), ("beta_v", beta_v), ("inverse_temperature", inverse_temperature), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number; got {value!r}")
    xp = namespace(heads_out, transforms, activations)
    dev = device_of(heads_out)
    if heads_out.ndim < 3 or transforms.ndim != 4:
        raise ValueError(f"heads_out must be (..., H, L, E) and transforms (H, M, E, F); got {tuple(heads_out.shape)}, "
                         f"{tuple(transforms.shape)}")
    heads, length, width = (int(n) for n in heads_out.shape[-3:])
    if (int(transforms.shape[0]), int(transforms.shape[2])) != (heads, width):
        raise ValueError(f"transforms must have shape (H, M, E, F) with H = {heads}, E = {width}; got {tuple(transforms.shape)}")
    if device_of(transforms) != dev:
        raise ValueError(f"transforms is on device {device_of(transforms)}; heads_out is on {dev}")
    dtype = resolve_dtype(xp, compute_dtype)
    outputs, out_dim = int(transforms.shape[1]), int(transforms.shape[3])
    nb = heads_out.ndim - 3
    o = xp.permute_dims(xp.astype(heads_out, dtype), (*range(nb), nb + 1, nb, nb + 2))  # (..., L, H, E)
    # votes û (..., L, H, M, F) = o_h (1, E) @ W_hm (E, F)
    votes = (o[..., :, None, None, :] @ xp.astype(transforms, dtype))[..., 0, :]
    coupling_shape = (*o.shape[:-1], outputs)
    if variant == "dynamic":
        logits = xp.zeros(coupling_shape, dtype=dtype, device=dev)
        for r in range(iterations):
            coefficients = _routing_softmax(xp, logits)
            capsules = _squash(xp, xp.sum(coefficients[..., None] * votes, axis=-3))  # (..., L, M, F)
            if r < iterations - 1:
                logits = logits + xp.sum(votes * capsules[..., None, :, :], axis=-1)
    else:
        if activations is None:
            a_in = xp.ones((*o.shape[:-1], 1), dtype=dtype, device=dev)
        else:
            if tuple(activations.shape) != tuple(heads_out.shape[:-1]):
                raise ValueError(f"activations must have shape (..., H, L) = {tuple(heads_out.shape[:-1])}; got {tuple(activations.shape)}")
            a_in = xp.permute_dims(xp.astype(activations, dtype), (*range(nb), nb + 1, nb))[..., None]  # (..., L, H, 1)
        coefficients = xp.full(coupling_shape, 1.0 / outputs, dtype=dtype, device=dev)
        for r in range(iterations):
            weighted = coefficients * a_in  # R' (..., L, H, M)
            mass = xp.sum(weighted, axis=-2)[..., None]  # (..., L, M, 1)
            capsules = xp.sum(weighted[..., None] * votes, axis=-3) / mass  # μ (..., L, M, F)
            spread = votes - capsules[..., None, :, :]
            variance = xp.sum(weighted[..., None] * spread * spread, axis=-3) / mass + eps
            cost = xp.sum((beta_v + 0.5 * xp.log(variance)) * mass, axis=-1)  # (..., L, M)
            if r < iterations - 1:
                # log a_m = log sigmoid(x) = −softplus(−x), stable: 1/(1 + e^{−x}) underflows to 0 (log → −∞,
                # then a row of −∞ routing logits gives NaN) once the cost exceeds β_a by ~745/λ
                x = inverse_temperature * (beta_a - cost)
                log_a_out = -(xp.maximum(-x, 0.0) + xp.log1p(xp.exp(-xp.abs(x))))
                log_p = -xp.sum(spread * spread / (2.0 * variance[..., None, :, :])
                                + 0.5 * xp.log(2.0 * math.pi * variance[..., None, :, :]), axis=-1)
                coefficients = _routing_softmax(xp, log_a_out[..., None, :] + log_p)
    out = xp.reshape(capsules, (*capsules.shape[:-2], outputs * out_dim))
    return (out, coefficients) if return_coefficients else out


def _squash_vjp(xp: Any, s: Any, d_v: Any) -> Any:
    """``ds`` of ``v = s·‖s‖/(1 + ‖s‖²)``: ``ds = f dv + s ⟨s, dv⟩ (1 − q)/(√q (1 + q)²)`` with ``q = ‖s‖²``,
    ``f = √q/(1 + q)`` (the second term is taken as 0 at s = 0, where v is not differentiable)."""
    sq = xp.sum(s * s, axis=-1, keepdims=True)
    root = xp.sqrt(sq)
    radial = xp.where(sq > 0, (1.0 - sq) / (xp.where(sq > 0, root, 1.0) * (1.0 + sq) ** 2), 0.0)
    return d_v * root / (1.0 + sq) + s * xp.sum(s * d_v, axis=-1, keepdims=True) * radial


def _capsule_routing_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, iterations: int = 3, variant: str = "dynamic",
                         beta_a: float = 0.0, beta_v: float = 0.0, inverse_temperature: float = 1.0, eps: float = 1e-9,
                         return_coefficients: bool = False, compute_dtype: Any = None) -> dict:
    """VJP of :func:`capsule_routing_attention` (of ``out``): ``d heads_out``, ``d transforms`` and, for EM,
    ``d activations`` — reverse mode through every unrolled routing round (the coefficients are not
    constants: the gradient flows through each round's agreement or E-step).

    Dynamic, round r (``c = softmax(b)``, ``s = Σ_h c û``, ``v = squash(s)``, ``b' = b + ⟨û, v⟩``):
    ``dv = Σ_h db' û`` (the last round: ``dO``), ``dû += db' v``; ``ds`` by :func:`_squash_vjp`;
    ``dc = ⟨û, ds⟩``, ``dû += c ds``; ``db = db' + c ∘ (dc − Σ_m c ∘ dc)``.
    EM, round r (``R' = R a``, ``μ``, ``σ²``, cost, ``R_next = softmax(log a_m + log N)``): the E-step's
    softmax VJP gives ``d log a_m``, ``d log N``; ``d log N`` → ``d spread = −d log N·(û − μ)/σ²``,
    ``dσ² += d log N·((û − μ)²/(2σ⁴) − 1/(2σ²))``; ``d cost = −λ σ(−x) d log a_m``, ``dσ² += d cost·mass/(2σ²)``,
    ``d mass += Σ_f (β_v + ½ log σ²) d cost``; then the M-step's sums back to ``R'``, ``û`` and
    ``a`` (``dR = dR'·a``, ``da = Σ_m dR'·R``). Finally ``û = o W``: ``do = Σ_m dû Wᵀ``, ``dW = Σ oᵀ dû``.
    ``return_coefficients=True`` is refused (the VJP differentiates ``out``).
    """
    from reflex.mechanisms import _grad

    if return_coefficients:
        raise ValueError("the VJP differentiates out only; call it with return_coefficients=False")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    heads_out, transforms, activations = inputs["heads_out"], inputs["transforms"], inputs.get("activations")
    xp = namespace(heads_out, transforms, activations)
    dev = device_of(heads_out)
    dtype = resolve_dtype(xp, compute_dtype)
    outputs, out_dim = int(transforms.shape[1]), int(transforms.shape[3])
    nb = heads_out.ndim - 3
    o = xp.permute_dims(xp.astype(heads_out, dtype), (*range(nb), nb + 1, nb, nb + 2))  # (..., L, H, E)
    w_t = xp.astype(transforms, dtype)
    votes = (o[..., :, None, None, :] @ w_t)[..., 0, :]  # (..., L, H, M, F)
    coupling_shape = (*o.shape[:-1], outputs)
    d_caps = xp.reshape(xp.astype(d_out, dtype), (*o.shape[:-2], outputs, out_dim))  # (..., L, M, F)
    d_votes = xp.zeros(votes.shape, dtype=dtype, device=dev)
    grads = {}
    if variant == "dynamic":
        logits, rounds = xp.zeros(coupling_shape, dtype=dtype, device=dev), []
        for r in range(iterations):
            coefficients = _routing_softmax(xp, logits)
            s = xp.sum(coefficients[..., None] * votes, axis=-3)
            capsules = _squash(xp, s)
            rounds.append((coefficients, s, capsules))
            if r < iterations - 1:
                logits = logits + xp.sum(votes * capsules[..., None, :, :], axis=-1)
        d_logits = xp.zeros(coupling_shape, dtype=dtype, device=dev)  # adjoint of the logits after round r
        for r in reversed(range(iterations)):
            coefficients, s, capsules = rounds[r]
            if r == iterations - 1:
                d_v = d_caps
            else:
                d_v = xp.sum(d_logits[..., None] * votes, axis=-3)
                d_votes = d_votes + d_logits[..., None] * capsules[..., None, :, :]
            d_s = _squash_vjp(xp, s, d_v)
            d_c = xp.sum(votes * d_s[..., None, :, :], axis=-1)
            d_votes = d_votes + coefficients[..., None] * d_s[..., None, :, :]
            d_logits = d_logits + _grad.softmax_vjp(xp, coefficients, d_c)
    else:
        if activations is None:
            a_in = xp.ones((*o.shape[:-1], 1), dtype=dtype, device=dev)
        else:
            a_in = xp.permute_dims(xp.astype(activations, dtype), (*range(nb), nb + 1, nb))[..., None]
        coefficients, rounds = xp.full(coupling_shape, 1.0 / outputs, dtype=dtype, device=dev), []
        lam = inverse_temperature
        for r in range(iterations):
            weighted = coefficients * a_in
            mass = xp.sum(weighted, axis=-2)[..., None]
            capsules = xp.sum(weighted[..., None] * votes, axis=-3) / mass
            spread = votes - capsules[..., None, :, :]
            variance = xp.sum(weighted[..., None] * spread * spread, axis=-3) / mass + eps
            state = dict(coefficients=coefficients, weighted=weighted, mass=mass, capsules=capsules, spread=spread,
                         variance=variance)
            if r < iterations - 1:
                cost = xp.sum((beta_v + 0.5 * xp.log(variance)) * mass, axis=-1)
                x = lam * (beta_a - cost)
                log_a_out = -(xp.maximum(-x, 0.0) + xp.log1p(xp.exp(-xp.abs(x))))
                log_p = -xp.sum(spread * spread / (2.0 * variance[..., None, :, :])
                                + 0.5 * xp.log(2.0 * math.pi * variance[..., None, :, :]), axis=-1)
                coefficients = _routing_softmax(xp, log_a_out[..., None, :] + log_p)
                state.update(x=x, next=coefficients)
            rounds.append(state)
        d_next = None  # adjoint of the coefficients the round produced
        d_a = xp.zeros(a_in.shape, dtype=dtype, device=dev)
        for r in reversed(range(iterations)):
            st = rounds[r]
            weighted, mass, capsules, spread, variance = (st[n] for n in ("weighted", "mass", "capsules", "spread",
                                                                          "variance"))
            d_mu = d_caps if r == iterations - 1 else xp.zeros(capsules.shape, dtype=dtype, device=dev)
            d_spread = xp.zeros(spread.shape, dtype=dtype, device=dev)
            d_var = xp.zeros(variance.shape, dtype=dtype, device=dev)
            d_mass = xp.zeros(mass.shape, dtype=dtype, device=dev)
            if r < iterations - 1:
                d_z = _grad.softmax_vjp(xp, st["next"], d_next)  # (..., L, H, M)
                d_log_a = xp.sum(d_z, axis=-2)  # (..., L, M)
                var_b = variance[..., None, :, :]
                d_spread = d_spread - d_z[..., None] * spread / var_b
                d_var = d_var + xp.sum(d_z[..., None] * (spread * spread / (2.0 * var_b * var_b) - 0.5 / var_b), axis=-3)
                x = st["x"]
                sigmoid_neg = xp.exp(-(xp.maximum(x, 0.0) + xp.log1p(xp.exp(-xp.abs(x)))))  # σ(−x)
                d_cost = -lam * d_log_a * sigmoid_neg  # (..., L, M)
                d_var = d_var + d_cost[..., None] * mass * 0.5 / variance
                d_mass = d_mass + xp.sum((beta_v + 0.5 * xp.log(variance)) * d_cost[..., None], axis=-1, keepdims=True)
            # σ² = Σ_h R' spread² / mass + eps
            d_weighted = xp.sum(d_var[..., None, :, :] * spread * spread, axis=-1) / mass[..., 0][..., None, :]
            d_spread = d_spread + 2.0 * d_var[..., None, :, :] * weighted[..., None] * spread / mass[..., None, :, :]
            d_mass = d_mass - xp.sum(d_var * (variance - eps), axis=-1, keepdims=True) / mass
            # spread = û − μ
            d_mu = d_mu - xp.sum(d_spread, axis=-3)
            d_votes = d_votes + d_spread
            # μ = Σ_h R' û / mass
            d_weighted = d_weighted + xp.sum(d_mu[..., None, :, :] * votes, axis=-1) / mass[..., 0][..., None, :]
            d_votes = d_votes + weighted[..., None] * d_mu[..., None, :, :] / mass[..., None, :, :]
            d_mass = d_mass - xp.sum(d_mu * capsules, axis=-1, keepdims=True) / mass
            # mass = Σ_h R'
            d_weighted = d_weighted + d_mass[..., 0][..., None, :]
            # R' = R a
            d_a = d_a + xp.sum(d_weighted * st["coefficients"], axis=-1, keepdims=True)
            d_next = d_weighted * a_in
        if activations is not None:
            grads["activations"] = xp.permute_dims(d_a[..., 0], (*range(nb), nb + 1, nb))
    # û = o W: d o_h = Σ_m dû_hm W_hmᵀ, dW_hm = Σ o_hᵀ dû_hm
    d_o = xp.sum((d_votes[..., None, :] @ xp.matrix_transpose(w_t))[..., 0, :], axis=-2)  # (..., L, H, E)
    heads, width = int(o.shape[-2]), int(o.shape[-1])
    o_rows = xp.permute_dims(xp.reshape(o, (-1, heads, width)), (1, 2, 0))  # (H, E, N)
    d_rows = xp.permute_dims(xp.reshape(d_votes, (-1, heads, outputs, out_dim)), (1, 2, 0, 3))  # (H, M, N, F)
    d_w = o_rows[:, None, :, :] @ d_rows  # (H, M, E, F)
    grads["heads_out"] = xp.permute_dims(d_o, (*range(nb), nb + 1, nb, nb + 2))
    grads["transforms"] = d_w
    return grads


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    heads, e = d["H"], d["E"]
    heads_out = random.normal((2, heads, d["L"], e), seed=(seed, 0))
    transforms = random.normal((heads, 3, e, 4), seed=(seed, 1), std=e ** -0.5)
    inputs = {"heads_out": heads_out, "transforms": transforms}
    positional = ("heads_out", "transforms")
    return [
        Case("dynamic", inputs, {"iterations": 3}, positional=positional, seed=seed),
        Case("uniform", inputs, {"iterations": 1}, positional=positional, seed=seed),
        Case("em", {**inputs, "activations": random.uniform((2, heads, d["L"]), seed=(seed, 2), low=0.1)},
             {"variant": "em", "iterations": 3, "beta_a": 0.5, "beta_v": 0.1}, positional=positional, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", {"heads_out": random.normal((1, heads, seq, dim), seed=(seed, 0)),
                            "transforms": random.normal((heads, heads, dim, dim), seed=(seed, 1), std=dim ** -0.5)},
                {}, positional=("heads_out", "transforms"), seed=seed)


register(Mechanism(
    key="capsule_routing",
    function=capsule_routing_attention,
    family="J. multi-head",
    paper="Gu & Feng 2019 (NLPCC) §3; Li et al. 2019 (NAACL) §3.2-3.3; Sabour 2017; Hinton 2018",
    params={"transforms": "W (H, M, E, F): vote transforms", "iterations": "routing rounds T >= 1",
            "variant": "'dynamic' | 'em'", "activations": "EM input activations (..., H, L), default 1",
            "beta_a, beta_v": "EM cost offsets", "inverse_temperature": "EM lambda", "eps": "EM variance floor",
            "return_coefficients": "also return routing coefficients (..., L, H, M)"},
    cases=_cases,
    example=_example,
    vjp=_capsule_routing_vjp,
))
