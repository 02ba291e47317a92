"""RealFormer residual attention: each layer's raw scores add the previous layer's raw scores."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import standard
from reflex.mechanisms._patterns import mask_and_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._numerics import unbroadcast

__all__ = ["residual_attention"]


@typed_options(engine_options="layout")  # no generic sinks: its lse comes third, after the scores
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


def _residual_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, d_scores: Any = None, mask: Any = None,
                  causal: bool | str = False, scale: float | None = None, compute_dtype: Any = None,
                  implementation: str = "auto") -> dict:
    """VJP of :func:`residual_attention`: ``dq``, ``dk``, ``dv`` and ``d prev_scores`` (when given).

    ``d_scores`` (optional, shaped like the returned raw scores ``(..., H, L, S)``) is the cotangent of
    the second output — the next layer's ``d prev_scores``, so a RealFormer stack is differentiated
    layer by layer. The engine's backward (dense, or tiled: FlashAttention-2 Alg. 2) of the softmax
    with ``prev_scores`` as a bias gives ``dQ``, ``dK``, ``dV`` and ``dZ`` (0 on masked entries); then
    ``d prev = dZ + d_scores``, ``dQ += scale·d_scores K``, ``dK += scale·d_scoresᵀ Q`` (summed over
    the query heads of a kv head and over the axes ``prev_scores`` was broadcast along).
    """
    from reflex.mechanisms import _grad

    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = p.xp
    prev = _kernels.check_term(p, "prev_scores", inputs.get("prev_scores"), boolean=False)
    masks, tile_active = mask_and_causal(p, mask, causal)
    resolved = _kernels.resolve_scale(scale, p.dim)
    g = _grad.softmax_attention_vjp(p, d_out, d_lse, scale=resolved, mask=masks, bias=prev, tile_active=tile_active,
                                    implementation=implementation)
    grads = {"q": g.dq, "k": g.dk, "v": g.dv}
    if prev is not None:
        grads["prev_scores"] = g.bias[0]
    if d_scores is not None:
        if tuple(d_scores.shape) != tuple(p.score_shape):
            raise ValueError(f"d_scores must have the scores' shape {tuple(p.score_shape)}; got {tuple(d_scores.shape)}")
        d_s = _grad.group_queries(p, xp.astype(d_scores, p.q.dtype))
        k = xp.expand_dims(p.k, axis=-3)
        grads["q"] = grads["q"] + _grad.ungroup(p, resolved * (d_s @ k))
        grads["k"] = grads["k"] + resolved * xp.sum(xp.matrix_transpose(d_s) @ _grad.group_queries(p, p.q), axis=-3)
        if prev is not None:
            grads["prev_scores"] = grads["prev_scores"] + unbroadcast(xp, xp.astype(d_scores, p.q.dtype),
                                                                          tuple(prev.shape))
    return grads


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
    vjp=_residual_vjp,
))
