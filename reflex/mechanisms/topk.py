"""Explicit sparse (top-k) attention: each query keeps its k highest-scoring keys."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from reflex.backends import namespace

from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, standard
from reflex.mechanisms._patterns import check_positive_int, index_counts, parse_causal, top_indices
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["topk_attention", "topk_indices"]

IMPLEMENTATIONS = ("auto", "gather", "dense")


def _selection_scores(p: _kernels.Prepared, scale: float, mask: Any, alignment: str | None, i0: int, i1: int) -> Any:
    """``scale·q·kᵀ`` for query rows ``i0:i1`` with masked and (causally) future keys at −∞."""
    xp = p.xp
    rows = dataclasses.replace(p, q=p.q[..., i0:i1, :], length=i1 - i0)
    s = _kernels.scores(rows, scale=scale)
    if mask is not None:
        m = mask[..., i0:i1, :] if mask.ndim >= 2 and mask.shape[-2] != 1 else mask  # a 1-D mask is per key
        s = xp.where(m, s, -math.inf)
    if alignment is not None:
        offset = 0 if alignment == "top_left" else p.key_length - p.length
        r = xp.reshape(xp.arange(i0, i1, dtype=xp.int64, device=p.device), (i1 - i0, 1))
        c = xp.reshape(xp.arange(p.key_length, dtype=xp.int64, device=p.device), (1, p.key_length))
        s = xp.where(c <= r + offset, s, -math.inf)
    return s


def _indices(p: _kernels.Prepared, top_k: int, scale: float, mask: Any, alignment: str | None,
             block_q: int = 1024) -> Any:
    xp = p.xp
    blocks = [top_indices(xp, _selection_scores(p, scale, mask, alignment, i0, min(i0 + block_q, p.length)), top_k)
              for i0 in range(0, p.length, block_q)]
    if not blocks or p.key_length == 0:
        return xp.full((*p.batch, p.heads, p.length, 0), -1, dtype=xp.int64, device=p.device)
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=-2)


@typed_options()
def topk_indices(q: Any, k: Any, /, *, top_k: int, causal: bool | str = False, mask: Any = None,
                 scale: float | None = None, compute_dtype: Any = None) -> Any:
    """The keys each query attends in :func:`topk_attention`: int64 ``(..., H, L, min(top_k, S))``.

    Row ``i`` lists the ``top_k`` keys with the largest ``scale·q_i·k_j`` among the allowed ones
    (``mask`` True and, when causal, ``j ≤ i + δ``), best first; ties go to the lower key index;
    slots beyond the number of allowed keys hold −1.
    """
    p = _kernels.prepare(q, k, k, compute_dtype=compute_dtype)
    mask = _kernels.check_term(p, "mask", mask, boolean=True)
    return _indices(p, check_positive_int("top_k", top_k), _kernels.resolve_scale(scale, p.dim), mask, parse_causal(causal))


@typed_options()
def topk_attention(q: Any, k: Any, v: Any, /, *, top_k: int, causal: bool | str = False, mask: Any = None,
                   scale: float | None = None, return_lse: bool = False, compute_dtype: Any = None,
                   implementation: str = "auto") -> Any:
    """Top-k (explicit sparse) attention: softmax over each query's k highest-scoring keys.

    .. math::

        s_{ij} = \\mathrm{scale}\\; q_i \\cdot k_j, \\qquad
        T_i = \\operatorname{top\\text{-}k}_{j \\in A_i}\\, s_{ij}, \\qquad
        o_i = \\sum_{j \\in T_i} \\frac{e^{s_{ij}}}{\\sum_{j' \\in T_i} e^{s_{ij'}}}\\, v_j

    where ``A_i`` is the set of allowed keys (``mask`` True; ``j ≤ i + δ`` when causal).

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``out (..., H, L, E)``;
    GQA: query head h selects among the keys of kv head ``h // (H/G)``.

    Args:
        top_k: keys kept per query (≥ 1). ``top_k ≥ S`` keeps every allowed key: full attention.
        causal: ``False``, ``True``/``"top_left"`` (j ≤ i) or ``"bottom_right"`` (j ≤ i + S − L).
        mask: boolean, True = allowed, broadcastable to ``(..., H, L, S)``; masked keys are never
            selected.
        scale: score scale, default 1/√D; selection and softmax use the same scores.
        return_lse: also return ``lse (..., H, L)``.
        compute_dtype: arithmetic dtype (default float64).
        implementation: ``"gather"`` (attend the selected index lists, :func:`topk_indices`),
            ``"dense"`` (full attention masked to the selected keys) or ``"auto"`` (gather).

    Conventions: ties in score are broken by the lower key index (stable sort), so the selection is
    deterministic; a query with fewer than ``top_k`` allowed keys attends all of them; a query with
    none outputs 0 and lse −∞. Scores are the engine's: float64 unless ``compute_dtype`` says
    otherwise. The attended keys are :func:`topk_indices`.

    References: Zhao et al. 2019, "Explicit Sparse Transformer: Concentrated Attention Through
    Explicit Selection", §2 (top-k selection before the softmax, eq. 3–5).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}")
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    mask = _kernels.check_term(p, "mask", mask, boolean=True)
    scale = _kernels.resolve_scale(scale, p.dim)
    indices = _indices(p, check_positive_int("top_k", top_k), scale, mask, parse_causal(causal))
    if implementation == "dense":
        selected = index_counts(p.xp, indices, p.key_length) > 0
        out, lse = _kernels.dense(p, scale=scale, mask=selected)
    else:
        out, lse = _kernels.gather(p, indices, scale=scale)
    return (out, lse) if return_lse else out


def _pattern(q: Any, k: Any, v: Any, /, *, top_k: int, causal: bool | str = False, mask: Any = None,
             scale: float | None = None, compute_dtype: Any = None, **_: Any) -> Any:
    """Boolean ``(..., H, L, S)``: True where the query attends the key."""
    idx = topk_indices(q, k, top_k=top_k, causal=causal, mask=mask, scale=scale, compute_dtype=compute_dtype)
    return index_counts(namespace(idx), idx, int(k.shape[-2])) > 0


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """The dense path: full attention masked to the selected keys."""
    return topk_attention(q, k, v, **{**params, "implementation": "dense"})


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    tied = {**gqa, "k": gqa["k"].copy()}
    tied["k"][..., 1::2, :] = tied["k"][..., 0:-1:2, :]  # duplicated keys: exact score ties
    half = max(1, d["S"] // 2)
    return [
        Case("gqa", gqa, {"top_k": half}, seed=seed),
        Case("causal", gqa, {"top_k": 3, "causal": "top_left"}, seed=seed),
        Case("bottom_right", gqa, {"top_k": 2, "causal": "bottom_right"}, seed=seed),
        Case("ties", tied, {"top_k": 3}, seed=seed),
        Case("all_keys", gqa, {"top_k": d["S"]}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", example_qkv(seq, heads, dim, seed), {"top_k": min(64, seq)}, seed=seed)


register(Mechanism(
    key="topk",
    function=topk_attention,
    family="C. content-sparse",
    paper="Zhao et al. 2019, Explicit Sparse Transformer §2",
    params={
        "top_k": "keys kept per query (the catalogue's k)",
        "causal": "False | True | 'top_left' | 'bottom_right'",
        "mask": "boolean (..., H, L, S)-broadcastable: keys allowed for selection",
        "scale": "score scale, default 1/sqrt(D)",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    pattern=_pattern,
    example=_example,
    vjp=_kernels.engine_vjp(topk_attention, selection_calls=True),
))
