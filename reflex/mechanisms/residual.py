"""RealFormer residual attention: each layer's raw scores add the previous layer's raw scores."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import standard
from reflex.mechanisms._patterns import mask_and_causal
from reflex.registry import Case, Mechanism, register

__all__ = ["residual_attention"]


def residual_attention(q: Any, k: Any, v: Any, /, *, prev_scores: Any = None, mask: Any = None,
                       causal: bool | str = False, scale: float | None = None, return_lse: bool = False,
                       compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """RealFormer residual attention: softmax(scale·QKᵀ + previous raw scores) V; returns the raw scores.

    .. math::

        S_l = \\mathrm{scale}\\cdot Q_l K_l^\\top + S_{l-1}, \\qquad
        O_l = \\mathrm{softmax}(S_l + \\log \\mathrm{mask})\\, V_l

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)``, ``prev_scores``
    broadcastable to ``(..., H, L, S)`` (``None`` = first layer, S₀ = 0). Returns
    ``(out (..., H, L, E), scores (..., H, L, S))`` — and ``lse`` third with ``return_lse`` — where
    ``scores`` S_l are the *raw* scores, before any mask, to be passed as the next layer's
    ``prev_scores`` (the paper's residual edge carries pre-softmax, pre-mask logits; masks are
    applied per layer, so masked entries never turn into −∞ residuals). The softmax runs in the
    engine with ``prev_scores`` as a bias term; ``mask``/``causal``/``scale`` as in
    :func:`reflex.full_attention`.

    Reference: He et al. 2021, "RealFormer: Transformer Likes Residual Attention", Findings of ACL,
    §3 (eq. 3–4).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    prev = _kernels.check_term(p, "prev_scores", prev_scores, boolean=False)
    masks, tile_active = mask_and_causal(p, mask, causal)
    resolved = _kernels.resolve_scale(scale, p.dim)
    out, lse = _kernels.softmax_attention(p, scale=resolved, mask=masks, bias=prev, tile_active=tile_active,
                                          implementation=implementation, return_lse=True)
    scores = _kernels.scores(p, scale=resolved)
    if prev is not None:
        scores = scores + prev
    return (out, scores, lse) if return_lse else (out, scores)


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    prev = random.normal((2, d["H"], d["L"], d["S"]), seed=(seed, 3))
    return [
        Case("first_layer", gqa, {}, seed=seed),
        Case("prev_scores", {**gqa, "prev_scores": prev}, {}, seed=seed),
        Case("prev_scores_causal", {**gqa, "prev_scores": prev}, {"causal": "bottom_right"}, seed=seed),
    ]


register(Mechanism(
    key="residual",
    function=residual_attention,
    family="G. prior",
    paper="He et al. 2021, RealFormer: Transformer Likes Residual Attention, §3",
    params={"prev_scores": "raw scores of the previous layer, (..., H, L, S)-broadcastable (None = 0)",
            "mask": "as full", "causal": "as full", "scale": "default 1/sqrt(D)"},
    cases=_cases,
))
