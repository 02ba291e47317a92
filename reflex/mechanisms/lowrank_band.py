"""Low-rank plus band attention: softmax attention in a rank-r projected space, plus a local band."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, standard
from reflex.mechanisms._patterns import band_pattern, check_window
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["lowrank_band_attention"]


def _check_projection(prep: _kernels.Prepared, name: str, proj: Any) -> Any:
    xp = prep.xp
    if namespace(proj) is not xp or device_of(proj) != prep.device:
        raise TypeError(f"{name} must come from the same array library and device as q ({prep.device})")
    if proj.ndim != 2 or int(proj.shape[0]) != prep.dim or int(proj.shape[1]) < 1:
        raise ValueError(f"{name} must have shape (D, r) = ({prep.dim}, r) with r >= 1; got {tuple(proj.shape)}")
    return xp.astype(proj, prep.q.dtype)


@typed_options()
def lowrank_band_attention(q: Any, k: Any, v: Any, /, *, q_proj: Any, window: tuple[int, int], k_proj: Any = None,
                           scale: float | None = None, lowrank_scale: float | None = None, compute_dtype: Any = None,
                           implementation: str = "auto") -> Any:
    """Low-rank attention (q, k projected to rank r) plus band attention, summed.

    .. math::

        O = \\mathrm{softmax}\\big(s_r\\,(Q W_Q)(K W_K)^\\top\\big)\\,V
          + \\mathrm{softmax}_{\\,j - i \\in [-\\ell, r_w]}\\big(s\\, Q K^\\top\\big)\\,V

    (Guo et al. 2019, "Low-Rank and Locality Constrained Self-Attention for Sequence Modeling",
    IEEE/ACM TASLP 27(12), §III: a low-rank global module with a small projected dimension and a
    band (locality-constrained) module; combined here by summation, the catalogue's semantics).

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``;
    ``q_proj``, ``k_proj`` of shape ``(D, r)``.

    Args:
        q_proj: W_Q (D, r), explicit. k_proj: W_K (D, r); default shares W_Q.
        window: ``(left, right)`` of the band (−1 = unbounded side), query i at key i.
        scale: s of the band, default 1/√D. lowrank_scale: s_r, default 1/√r.
        implementation: engine kernel for both softmaxes (band tiles are skipped when tiled).

    A query whose band holds no key gets 0 from the band. With ``W_Q = W_K = I`` (r = D) and
    ``lowrank_scale = scale`` the low-rank term is ``full_attention``.
    """
    prep = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    left, right = check_window(window)
    wq = _check_projection(prep, "q_proj", q_proj)
    wk = wq if k_proj is None else _check_projection(prep, "k_proj", k_proj)
    rank = int(wq.shape[1])
    if int(wk.shape[1]) != rank:
        raise ValueError(f"k_proj has rank {wk.shape[1]}; q_proj has {rank}: they must match")
    s_rank = 1.0 / math.sqrt(rank) if lowrank_scale is None else _kernels.resolve_scale(lowrank_scale, rank)
    projected = _kernels.prepare(prep.q @ wq, prep.k @ wk, prep.v, compute_dtype=prep.q.dtype)
    global_part = _kernels.softmax_attention(projected, scale=s_rank, implementation=implementation)
    band = band_pattern(left, right)
    local = _kernels.softmax_attention(prep, scale=_kernels.resolve_scale(scale, prep.dim), mask=band.allowed,
                                       tile_active=band.tile_active, implementation=implementation)
    return global_part + local


def _lowrank_band_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, window: tuple[int, int], scale: float | None = None,
                      lowrank_scale: float | None = None, compute_dtype: Any = None, implementation: str = "auto") -> dict:
    """VJP of :func:`lowrank_band_attention`: ``dq``, ``dk``, ``dv``, ``d q_proj`` (and ``d k_proj`` when given).

    ``dO`` reaches both terms. The engine's backward (dense, or tiled: FlashAttention-2 Alg. 2) of the
    low-rank softmax on ``(QW_Q, KW_K, V)`` gives ``d(QW_Q)``, ``d(KW_K)``, ``dV``: ``dQ += d(QW_Q) W_Qᵀ``,
    ``dW_Q = Σ Qᵀ d(QW_Q)``, ``dK += d(KW_K) W_Kᵀ``, ``dW_K = Σ Kᵀ d(KW_K)`` (a shared W_Q receives both);
    the band term's backward (band tiles skipped when tiled) adds its ``dQ, dK, dV``.
    """
    from reflex.mechanisms import _grad

    prep = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = prep.xp
    left, right = check_window(window)
    wq = _check_projection(prep, "q_proj", inputs["q_proj"])
    shared = inputs.get("k_proj") is None
    wk = wq if shared else _check_projection(prep, "k_proj", inputs["k_proj"])
    rank = int(wq.shape[1])
    if int(wk.shape[1]) != rank:
        raise ValueError(f"k_proj has rank {wk.shape[1]}; q_proj has {rank}: they must match")
    s_rank = 1.0 / math.sqrt(rank) if lowrank_scale is None else _kernels.resolve_scale(lowrank_scale, rank)
    projected = _kernels.prepare(prep.q @ wq, prep.k @ wk, prep.v, compute_dtype=prep.q.dtype)
    g = _grad.softmax_attention_vjp(projected, d_out, scale=s_rank, implementation=implementation)
    band = band_pattern(left, right)
    b = _grad.softmax_attention_vjp(prep, d_out, scale=_kernels.resolve_scale(scale, prep.dim), mask=band.allowed,
                                    tile_active=band.tile_active, implementation=implementation)
    t = xp.matrix_transpose
    d_wq = _grad.sum_to_matrix(xp, t(prep.q) @ g.dq)
    d_wk = _grad.sum_to_matrix(xp, t(prep.k) @ g.dk)
    grads = {"q": b.dq + g.dq @ t(wq), "k": b.dk + g.dk @ t(wk), "v": b.dv + g.dv}
    if shared:
        grads["q_proj"] = d_wq + d_wk
    else:
        grads["q_proj"], grads["k_proj"] = d_wq, d_wk
    return grads


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    rank = max(1, d["D"] // 4)
    wq = random.normal((d["D"], rank), seed=(seed, 5))
    wk = random.normal((d["D"], rank), seed=(seed, 6))
    return [
        Case("shared_projection", {**gqa, "q_proj": wq}, {"window": [1, 1]}, seed=seed),
        Case("two_projections_causal_band", {**gqa, "q_proj": wq, "k_proj": wk}, {"window": [2, 0]}, seed=seed),
        Case("tiled", {**gqa, "q_proj": wq}, {"window": [1, 1], "implementation": "tiled"}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    projection = random.normal((dim, max(1, dim // 4)), seed=(seed, 5))
    w = min(64, max(1, seq // 16))
    return Case("example", {**example_qkv(seq, heads, dim, seed), "q_proj": projection}, {"window": [w, w]}, seed=seed)


register(Mechanism(
    key="lowrank_band",
    function=lowrank_band_attention,
    family="F. low-rank",
    paper="Guo et al. 2019, 'Low-Rank and Locality Constrained Self-Attention for Sequence Modeling', §III",
    params={
        "q_proj": "W_Q (D, r), explicit",
        "k_proj": "W_K (D, r); default shares W_Q",
        "window": "(left, right) of the band, -1 = unbounded",
        "scale": "band score scale, default 1/sqrt(D)",
        "lowrank_scale": "low-rank score scale, default 1/sqrt(r)",
    },
    cases=_cases,
    example=_example,
    vjp=_lowrank_band_vjp,
))
