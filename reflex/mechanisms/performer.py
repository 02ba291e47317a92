"""Performer (FAVOR+): softmax attention estimated with random features, linear in L."""

from __future__ import annotations

import math
from typing import Any, Callable

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, standard
from reflex.mechanisms.linear import _kernelized, causal_shift, check_form, grouped, safe_divide
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import Real, typed_options

__all__ = ["performer_attention"]

KERNELS = ("softmax_pos", "softmax_trig", "relu")
RELU_STABILIZER = 1e-3  # added to ReLU features, as the paper's code (fast_attention.relu_kernel_transformation)


def check_projection(p: _kernels.Prepared, projection: Any, num_features: Any, seed: Any, *, orthogonal: bool) -> Any:
    """The random projection ``ω (m, D)`` in the compute dtype: given, or drawn from ``seed``.

    Drawn projections are blocks of orthogonal rows with Gaussian norms (``orthogonal``) or i.i.d.
    N(0, 1) entries, on the host through :mod:`reflex.random`, then moved to q's device.
    """
    xp = p.xp
    if projection is not None:
        if seed is not None or num_features is not None:
            raise ValueError("pass either projection or (num_features, seed), not both")
        if namespace(projection) is not xp or device_of(projection) != p.device:
            raise TypeError(f"projection must come from the same array library and device as q ({p.device})")
        if projection.ndim != 2 or int(projection.shape[1]) != p.dim or int(projection.shape[0]) < 1:
            raise ValueError(f"projection must have shape (m, D) = (m, {p.dim}) with m >= 1; got {tuple(projection.shape)}")
        return xp.astype(projection, p.q.dtype)
    if seed is None:
        raise ValueError("pass an explicit projection (m, D) or a seed to draw one (no hidden randomness)")
    if num_features is None:
        num_features = max(1, round(p.dim * math.log(p.dim))) if p.dim > 1 else 1
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be an int >= 1; got {num_features!r}")
    draw = random.orthogonal if orthogonal else random.normal
    return xp.astype(draw((num_features, p.dim), seed=seed, xp=xp, device=p.device), p.q.dtype)


@typed_options(scale=Real(positive=True, optional=True))  # the features use sqrt(scale)
def performer_attention(q: Any, k: Any, v: Any, /, *, projection: Any = None, num_features: int | None = None,
                        seed: Any = None, kernel: str = "softmax_pos", causal: bool | str = False,
                        scale: float | None = None, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Performer FAVOR+: softmax attention through positive (or trigonometric) random features.

    .. math::

        \\mathrm{softmax}(s\\,QK^\\top)V \\approx
        \\frac{\\phi(Q)(\\phi(K)^\\top V)}{\\phi(Q)\\,\\phi(K)^\\top \\mathbf{1}},\\qquad
        \\phi(x) = \\tfrac{1}{\\sqrt m}\\exp\\big(\\omega^\\top x - \\tfrac{\\lVert x\\rVert^2}{2}\\big),\\;
        x = \\sqrt{s}\\, q \\text{ or } \\sqrt{s}\\, k

    with ω the m rows of ``projection`` (Choromanski et al. 2021, "Rethinking Attention with
    Performers", §2.3 eq. 7 (positive features, "softmax_pos"), eq. 5 (trigonometric,
    "softmax_trig": ``exp(‖x‖²/2)/√m [sin ωᵀx, cos ωᵀx]``), §2.4 (orthogonal ω), §2.5 and
    Fig. 1 (causal prefix sums)). ``"relu"`` is the paper code's generalised kernel
    ``relu(ωᵀx/√m) + 0.001`` on the raw q, k (scale unused).

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``.

    Stabilisation (exact, not an approximation): any factor constant over a query's features or over
    all keys of a head cancels between numerator and denominator. So query features drop
    ``exp(−‖x‖²/2)`` and subtract their row max of ``ωᵀx`` before ``exp``; key features subtract
    one constant per (batch, kv head), the max of ``ωᵀx − ‖x‖²/2`` over keys and features (the
    paper's code subtracts the max too). Scores of ±30 neither overflow nor give NaN. The paper
    code's additive 1e-6 on softmax features is not added (it biases the estimate). A query whose
    denominator is exactly 0 (causal, attends nothing) outputs 0.

    Args:
        projection: ``ω (m, D)``, explicit. Or ``num_features`` m (default round(D ln D)) and
            ``seed``: ω from :func:`reflex.random.orthogonal` (blocks of orthogonal rows, §2.4).
        kernel: ``"softmax_pos"`` (default), ``"softmax_trig"`` or ``"relu"``.
        causal: ``False``; ``True``/``"top_left"`` (j ≤ i) or ``"bottom_right"`` (j ≤ i + S − L).
        scale: the softmax scale s being approximated; default 1/√D (x = D^(−1/4) q as in the paper).
        compute_dtype: arithmetic dtype (default float64).
        implementation: ``"parallel"`` (= ``"auto"``), ``"recurrent"`` or ``"quadratic"``, see
            :func:`reflex.linear_attention`.
    """
    form = check_form(implementation)
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    omega_t = xp.matrix_transpose(check_projection(p, projection, num_features, seed, orthogonal=True))
    ratio = 1.0 / math.sqrt(int(omega_t.shape[-1]))
    qg, kg, _ = grouped(p)
    root = math.sqrt(_kernels.resolve_scale(scale, p.dim)) if kernel != "relu" else 1.0
    features_q, features_k = _features(xp, kernel, qg, kg, omega_t, root, ratio, p.key_length)
    return _kernelized(p, features_q, features_k, safe_divide(xp), offset=causal_shift(p, causal), form=form)


def _finite_or_floor(xp: Any, x: Any) -> Any:
    """``x`` with non-finite entries replaced by −∞ (left out of a max; an all-non-finite block gives −∞)."""
    return xp.where(xp.isfinite(x), x, -math.inf)


def _half_square_norm(xp: Any, x: Any) -> Any:
    return 0.5 * xp.sum(x * x, axis=-1, keepdims=True)


def _features(xp: Any, kernel: str, qg: Any, kg: Any, omega_t: Any, root: float, ratio: float,
              key_length: int) -> tuple[Callable[[int, int], Any], Callable[[int, int], Any]]:
    """Feature maps of query rows and key rows for ``kernel`` (see :func:`performer_attention`)."""
    block = 4096
    if kernel == "relu":
        def relu_features(x: Any) -> Any:
            u = ratio * (x @ omega_t)
            return xp.where(u > 0, u, 0.0) + RELU_STABILIZER
        return (lambda i0, i1: relu_features(qg[..., i0:i1, :]), lambda j0, j1: relu_features(kg[..., j0:j1, :]))

    if kernel == "softmax_pos":
        def key_exponent(j0: int, j1: int) -> Any:
            x = root * kg[..., j0:j1, :]
            return x @ omega_t - _half_square_norm(xp, x)  # ωᵀx − ‖x‖²/2

        # one stabilising constant per (batch, kv head): the max over every key and feature (it
        # cancels; non-finite exponents are left out so a NaN key reaches only the rows that use it)
        shift = None
        for j0 in range(0, key_length, block):
            top = xp.max(_finite_or_floor(xp, key_exponent(j0, min(j0 + block, key_length))), axis=(-2, -1),
                         keepdims=True)
            shift = top if shift is None else xp.maximum(shift, top)

        def query_pos(i0: int, i1: int) -> Any:
            u = (root * qg[..., i0:i1, :]) @ omega_t
            return ratio * xp.exp(u - xp.max(u, axis=-1, keepdims=True))

        return query_pos, lambda j0, j1: ratio * xp.exp(key_exponent(j0, j1) - shift)

    # softmax_trig: exp(‖x‖²/2)/√m [sin ωᵀx, cos ωᵀx]; the query's exp(‖x‖²/2) cancels.
    shift = None
    for j0 in range(0, key_length, block):
        top = xp.max(_finite_or_floor(xp, _half_square_norm(xp, root * kg[..., j0:min(j0 + block, key_length), :])),
                     axis=(-2, -1), keepdims=True)
        shift = top if shift is None else xp.maximum(shift, top)

    def trig(x: Any) -> Any:
        u = x @ omega_t
        return ratio * xp.concat([xp.sin(u), xp.cos(u)], axis=-1)

    def key_trig(j0: int, j1: int) -> Any:
        x = root * kg[..., j0:j1, :]
        return xp.exp(_half_square_norm(xp, x) - shift) * trig(x)

    return lambda i0, i1: trig(root * qg[..., i0:i1, :]), key_trig


def _performer_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, num_features: int | None = None, seed: Any = None,
                   kernel: str = "softmax_pos", causal: bool | str = False, scale: float | None = None,
                   compute_dtype: Any = None, implementation: str = "auto") -> dict:
    """VJP of :func:`performer_attention`: ``dq``, ``dk``, ``dv`` and ``d projection`` (when given).

    The kernelised core's backward (:func:`reflex.linear_attention`'s VJP) gives ``dφ(q)``, ``dφ(k)``,
    ``dv``; then per kernel, with ``x = √s·q`` (or ``√s·k``) and ``u = ωᵀx``:

    - ``softmax_pos``: ``du = dφ ∘ φ``; query ``dx = ω du``; key (exponent ``u − ‖x‖²/2``)
      ``dx = ω du − (Σ_f du) x``; ``dω = Σ x duᵀ`` over every query and key row.
    - ``softmax_trig``: with ``φ = [a_s, a_c] = h/√m [sin u, cos u]`` and ``dφ = [b_s, b_c]``:
      ``du = b_s ∘ a_c − b_c ∘ a_s``; keys (``h = e^{‖x‖²/2}``) add ``(Σ dφ ∘ φ) x`` to ``dx``.
    - ``relu``: ``u = ωᵀx/√m`` on the raw q, k; ``du = dφ`` where ``u > 0``, else 0 (subgradient 0 at
      the kink ``u = 0``); ``dx = ω du/√m``, ``dω = Σ x duᵀ/√m``.

    The stabilising shifts (a query's max over features, one constant over all keys of a head) are
    constants of the derivative: the output does not depend on them, so their derivative term is 0.
    """
    from reflex.mechanisms import _grad

    form = check_form(implementation)
    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = p.xp
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    omega_t = xp.matrix_transpose(check_projection(p, inputs.get("projection"), num_features, seed, orthogonal=True))
    m = int(omega_t.shape[-1])
    ratio = 1.0 / math.sqrt(m)
    qg, kg, _ = grouped(p)
    root = math.sqrt(_kernels.resolve_scale(scale, p.dim)) if kernel != "relu" else 1.0
    features_q, features_k = _features(xp, kernel, qg, kg, omega_t, root, ratio, p.key_length)
    fq, fk = features_q(0, p.length), features_k(0, p.key_length)
    d_fq, d_fk, d_v, _ = _grad.kernelized_vjp(p, fq, fk, _grad.divide_vjp(xp), d_out, offset=causal_shift(p, causal),
                                              form=form)
    xq, xk = root * qg, root * kg
    if kernel == "softmax_pos":
        du_q, du_k = d_fq * fq, d_fk * fk
        dx_q = du_q @ xp.matrix_transpose(omega_t)
        dx_k = du_k @ xp.matrix_transpose(omega_t) - xp.sum(du_k, axis=-1, keepdims=True) * xk
    elif kernel == "softmax_trig":
        def du(d: Any, f: Any) -> Any:
            return d[..., :m] * f[..., m:] - d[..., m:] * f[..., :m]
        du_q, du_k = du(d_fq, fq), du(d_fk, fk)
        dx_q = du_q @ xp.matrix_transpose(omega_t)
        dx_k = du_k @ xp.matrix_transpose(omega_t) + xp.sum(d_fk * fk, axis=-1, keepdims=True) * xk
    else:
        du_q = ratio * xp.where(xq @ omega_t > 0, d_fq, 0.0)
        du_k = ratio * xp.where(xk @ omega_t > 0, d_fk, 0.0)
        dx_q, dx_k = du_q @ xp.matrix_transpose(omega_t), du_k @ xp.matrix_transpose(omega_t)
    grads = {"q": _grad.ungroup(p, root * dx_q), "k": root * dx_k[..., 0, :, :], "v": d_v}
    if "projection" in inputs:
        d_omega_t = (_grad.sum_to_matrix(xp, xp.matrix_transpose(xq) @ du_q)
                     + _grad.sum_to_matrix(xp, xp.matrix_transpose(xk) @ du_k))
        grads["projection"] = xp.matrix_transpose(d_omega_t)
    return grads


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    projection = random.orthogonal((4 * d["D"], d["D"]), seed=(seed, 5))
    with_projection = {**gqa, "projection": projection}
    return [
        Case("softmax_pos", with_projection, {}, seed=seed),
        # trigonometric features have signed terms: at scale 1/sqrt(D) the tiny case's denominators
        # nearly cancel (outputs ~50), so forms differ by 3e-13; at 0.1 the estimate is well conditioned
        Case("softmax_trig", with_projection, {"kernel": "softmax_trig", "scale": 0.1}, seed=seed),
        Case("relu", with_projection, {"kernel": "relu"}, seed=seed),
        Case("causal_top_left", with_projection, {"causal": "top_left"}, seed=seed),
        Case("causal_bottom_right_recurrent", with_projection, {"causal": "bottom_right", "implementation": "recurrent"},
             seed=seed),
    ]


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """The materialised ``(L, S)`` feature-kernel matrix."""
    return performer_attention(q, k, v, **{**params, "implementation": "quadratic"})


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", example_qkv(seq, heads, dim, seed), {"num_features": 256, "seed": seed}, seed=seed)


register(Mechanism(
    key="performer",
    function=performer_attention,
    family="D. linearized",
    paper="Choromanski et al. 2021, 'Rethinking Attention with Performers', §2.3-2.5",
    params={
        "projection": "omega (m, D), explicit random features",
        "num_features": "m when drawing omega from seed (default round(D ln D))",
        "seed": "draws omega with reflex.random.orthogonal",
        "kernel": "'softmax_pos' | 'softmax_trig' | 'relu'",
        "causal": "False | True | 'top_left' | 'bottom_right'",
        "scale": "softmax scale approximated, default 1/sqrt(D)",
        "implementation": "'parallel' | 'recurrent' | 'quadratic'",
    },
    cases=_cases,
    reference=_reference,
    example=_example,
    vjp=_performer_vjp,
))
