"""cosFormer: ReLU features with a cos-based re-weighting, decomposed into linear cos/sin terms."""

from __future__ import annotations

import math
from typing import Any

from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import standard
from reflex.mechanisms.linear import _kernelized, causal_shift, check_form, grouped
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["cosformer_attention"]


@typed_options()
def cosformer_attention(q: Any, k: Any, v: Any, /, *, causal: bool | str = False, eps: float = 1e-6,
                        compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """cosFormer: relu(q)·relu(k) re-weighted by cos(π/2·(i − j)/M), in linear time.

    .. math::

        o_i = \\frac{\\sum_{j \\le t_i} \\mathrm{relu}(q_i)\\cdot\\mathrm{relu}(k_j)
                     \\cos\\!\\big(\\tfrac{\\pi}{2}\\tfrac{i' - j}{M}\\big)\\, v_j}
                    {\\max\\big(\\varepsilon,\\ \\sum_{j \\le t_i} \\mathrm{relu}(q_i)\\cdot\\mathrm{relu}(k_j)
                     \\cos(\\tfrac{\\pi}{2}\\tfrac{i' - j}{M})\\big)}

    computed linearly through ``cos(a − b) = cos a cos b + sin a sin b``: the features are
    ``[relu(x) sin θ, relu(x) cos θ]`` with ``θ = π/2 · position / M`` (Qin et al. 2022, "cosFormer:
    Rethinking Softmax in Attention", §3.3 eq. 9–11; the official code's ``M = max(L, S)`` and
    ``clamp_min(denominator, eps)``). The query position is ``i' = i + δ`` (causal alignment δ; 0 when
    not causal), the key position j; so ``|i' − j| < M`` and every weight is positive.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``.

    Args:
        causal: ``False``; ``True``/``"top_left"`` (j ≤ i) or ``"bottom_right"`` (j ≤ i + S − L).
        eps: floor of the denominator (default 1e-6, as the official code); a query that attends no
            key outputs 0.
        implementation: ``"parallel"`` (= ``"auto"``), ``"recurrent"`` or ``"quadratic"``, see
            :func:`reflex.linear_attention`.
    """
    form = check_form(implementation)
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0; got {eps!r}")
    offset = causal_shift(p, causal)
    shift = 0 if offset is None else offset
    horizon = max(p.length, p.key_length)
    qg, kg, _ = grouped(p)

    def features(x: Any, start: int) -> Any:
        count = int(x.shape[-2])
        angle = (math.pi / 2 / horizon) * xp.astype(xp.arange(start, start + count, dtype=xp.int64, device=p.device),
                                                      x.dtype)
        angle = xp.reshape(angle, (count, 1))
        relu = xp.where(x > 0, x, 0.0)
        return xp.concat([relu * xp.sin(angle), relu * xp.cos(angle)], axis=-1)

    eps = float(eps)
    return _kernelized(
        p, lambda i0, i1: features(qg[..., i0:i1, :], i0 + shift), lambda j0, j1: features(kg[..., j0:j1, :], j0),
        lambda num, den: num / xp.where(den > eps, den, eps), offset=offset, form=form,
    )


def _cosformer_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, causal: bool | str = False, eps: float = 1e-6,
                   compute_dtype: Any = None, implementation: str = "auto") -> dict:
    """VJP of :func:`cosformer_attention`: ``{"q": dq, "k": dk, "v": dv}``.

    The kernelised core's backward (see :func:`reflex.mechanisms._grad.kernelized_vjp`) with the
    clamped normaliser ``num / max(den, ε)``: ``d num = do / max(den, ε)``, ``d den = −⟨do, num⟩/den²``
    where ``den > ε`` and 0 on the clamp's branch. Features ``φ(x) = [relu(x) sin θ, relu(x) cos θ]``,
    ``dφ = [b_s, b_c]``: ``dx = b_s sin θ + b_c cos θ`` where ``x > 0``, else 0 (subgradient 0 at the
    kink ``x = 0``).
    """
    from reflex.mechanisms import _grad

    form = check_form(implementation)
    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = p.xp
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0; got {eps!r}")
    offset = causal_shift(p, causal)
    qg, kg, _ = grouped(p)
    q_angle = _angles(p, p.length, 0 if offset is None else offset)
    k_angle = _angles(p, p.key_length, 0)
    relu_q, relu_k = xp.where(qg > 0, qg, 0.0), xp.where(kg > 0, kg, 0.0)
    fq = xp.concat([relu_q * xp.sin(q_angle), relu_q * xp.cos(q_angle)], axis=-1)
    fk = xp.concat([relu_k * xp.sin(k_angle), relu_k * xp.cos(k_angle)], axis=-1)
    d_fq, d_fk, d_v, _ = _grad.kernelized_vjp(p, fq, fk, _grad.divide_vjp(xp, floor=float(eps)), d_out,
                                              offset=offset, form=form)
    D = p.dim

    def back(x: Any, angle: Any, d_f: Any) -> Any:
        return xp.where(x > 0, d_f[..., :D] * xp.sin(angle) + d_f[..., D:] * xp.cos(angle), 0.0)

    return {"q": _grad.ungroup(p, back(qg, q_angle, d_fq)), "k": back(kg, k_angle, d_fk)[..., 0, :, :], "v": d_v}


def _angles(p: _kernels.Prepared, count: int, start: int) -> Any:
    """``θ = π/2 · position / M`` of positions ``start … start + count − 1`` as ``(count, 1)``."""
    xp = p.xp
    horizon = max(p.length, p.key_length)
    angle = (math.pi / 2 / horizon) * xp.astype(xp.arange(start, start + count, dtype=xp.int64, device=p.device),
                                                  p.q.dtype)
    return xp.reshape(angle, (count, 1))


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    return [
        Case("gqa", gqa, {}, seed=seed),
        Case("causal_top_left", gqa, {"causal": "top_left"}, seed=seed),
        Case("causal_bottom_right", gqa, {"causal": "bottom_right"}, seed=seed),
        Case("causal_recurrent", gqa, {"causal": True, "implementation": "recurrent"}, seed=seed),
    ]


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """The materialised ``(L, S)`` re-weighted kernel matrix."""
    return cosformer_attention(q, k, v, **{**params, "implementation": "quadratic"})


register(Mechanism(
    key="cosformer",
    function=cosformer_attention,
    family="D. linearized",
    paper="Qin et al. 2022, 'cosFormer: Rethinking Softmax in Attention', §3.3",
    params={
        "causal": "False | True | 'top_left' | 'bottom_right'",
        "eps": "denominator floor (default 1e-6)",
        "implementation": "'parallel' | 'recurrent' | 'quadratic'",
    },
    cases=_cases,
    reference=_reference,
    vjp=_cosformer_vjp,
))
