"""cosFormer: ReLU features with a cos-based re-weighting, decomposed into linear cos/sin terms."""

from __future__ import annotations

import math
from typing import Any

from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import standard
from reflex.mechanisms.linear import _kernelized, causal_shift, check_form, grouped
from reflex.registry import Case, Mechanism, register

__all__ = ["cosformer_attention"]


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
))
