"""Block top-k attention (MoBA / NSA selection): each query keeps its k best key blocks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._patterns import causal_offset, check_positive_int, index_counts, parse_causal, top_indices
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["block_topk_attention", "block_topk_indices"]

IMPLEMENTATIONS = ("auto", "gather", "dense")


def _pooled_keys(p: _kernels.Prepared, block_size: int) -> Any:
    """Mean of each key block ``(..., G, ceil(S/b), D)``; the last block averages its actual keys."""
    xp = p.xp
    n_blocks = -(-p.key_length // block_size)
    pad = n_blocks * block_size - p.key_length
    k = p.k
    if pad:
        k = xp.concat([k, xp.zeros((*k.shape[:-2], pad, p.dim), dtype=k.dtype, device=p.device)], axis=-2)
    sums = xp.sum(xp.reshape(k, (*k.shape[:-2], n_blocks, block_size, p.dim)), axis=-2)
    sizes = xp.full((n_blocks, 1), float(block_size), dtype=k.dtype, device=p.device)
    if pad:
        sizes = xp.concat([sizes[:-1, :], xp.full((1, 1), float(block_size - pad), dtype=k.dtype, device=p.device)])
    return sums / sizes


def _block_scores(p: _kernels.Prepared, block_size: int, scale: float, alignment: str | None) -> tuple[Any, int]:
    xp = p.xp
    pooled = _pooled_keys(p, block_size)
    n_blocks = int(pooled.shape[-2])
    s = _kernels.scores(dataclasses.replace(p, k=pooled, key_length=n_blocks), scale=scale)  # (..., H, L, nb)
    offset = causal_offset(alignment or "top_left", p.length, p.key_length)
    position = xp.reshape(xp.arange(p.length, dtype=xp.int64, device=p.device), (p.length, 1)) + offset
    block = xp.reshape(xp.arange(n_blocks, dtype=xp.int64, device=p.device), (1, n_blocks))
    own = (block == position // block_size) & (position >= 0) & (position < p.key_length)
    s = xp.where(own, math.inf, s)
    if alignment is not None:
        s = xp.where(block * block_size > position, -math.inf, s)
    return s, n_blocks


def _indices(p: _kernels.Prepared, block_size: int, top_k: int, scale: float, alignment: str | None) -> Any:
    xp = p.xp
    s, n_blocks = _block_scores(p, block_size, scale, alignment)
    blocks = top_indices(xp, s, top_k)  # (..., H, L, k')
    within = xp.arange(block_size, dtype=xp.int64, device=p.device)
    keys = xp.expand_dims(blocks, axis=-1) * block_size + within
    keys = xp.where((xp.expand_dims(blocks, axis=-1) < 0) | (keys >= p.key_length), -1, keys)
    return xp.reshape(keys, (*keys.shape[:-2], int(blocks.shape[-1]) * block_size))


@typed_options()
def block_topk_indices(q: Any, k: Any, /, *, block_size: int, top_k: int, causal: bool | str = False,
                       scale: float | None = None, compute_dtype: Any = None) -> Any:
    """Key positions of each query's selected blocks: int64 ``(..., H, L, min(top_k, ⌈S/b⌉)·b)``, −1 = padding.

    Blocks are listed best first (the query's own block first); the causal mask inside the own block
    is applied by the attention, not here.
    """
    p = _kernels.prepare(q, k, k, compute_dtype=compute_dtype)
    return _indices(p, check_positive_int("block_size", block_size), check_positive_int("top_k", top_k),
                    _kernels.resolve_scale(scale, p.dim), parse_causal(causal))


@typed_options()
def block_topk_attention(q: Any, k: Any, v: Any, /, *, block_size: int, top_k: int, causal: bool | str = False,
                         scale: float | None = None, return_lse: bool = False, compute_dtype: Any = None,
                         implementation: str = "auto") -> Any:
    """Block top-k attention: each query attends the keys of its k highest-scoring key blocks.

    .. math::

        \\bar k_c = \\frac{1}{|B_c|}\\sum_{j \\in B_c} k_j, \\qquad
        g_{ic} = \\mathrm{scale}\\; q_i \\cdot \\bar k_c, \\qquad
        T_i = \\{c(i)\\} \\cup \\operatorname{top\\text{-}(k-1)}_{c \\ne c(i)} g_{ic},

        o_i = \\mathrm{softmax}_{j \\in \\cup_{c \\in T_i} B_c,\\ j \\le i + δ}(\\mathrm{scale}\\; q_i \\cdot k_j)\\, V

    Key blocks ``B_c = [c·b, (c+1)·b)`` (the last one may be short; its mean is over its actual keys).
    The query's own block ``c(i) = ⌊(i + δ)/b⌋`` (δ the causal offset; 0 when not causal) is always
    selected (when ``0 ≤ i + δ < S``). With ``causal``, blocks starting after ``i + δ`` are never
    selected and the causal mask applies inside the own block (MoBA §2.2). Selection is per query
    token and per head (GQA: query head h scores the pooled keys of kv head ``h // (H/G)``); ties go
    to the lower block index.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``.

    Args:
        block_size: b. top_k: blocks per query including the own block (the catalogue's k);
            ``top_k ≥ ⌈S/b⌉`` selects every block: full (causal) attention.
        causal: ``False``, ``True``/``"top_left"`` or ``"bottom_right"``. scale: default 1/√D.
        return_lse, compute_dtype: as in :func:`reflex.full_attention`.
        implementation: ``"gather"`` (the selected index lists), ``"dense"`` (full attention masked
            to them) or ``"auto"`` (gather).

    References: Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs", §2.2
    (mean-pooled block gating, current block always selected, causal); Yuan et al. 2025, "Native
    Sparse Attention", §3.3.2 (blockwise selection by top-n block importance).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}")
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    alignment = parse_causal(causal)
    scale = _kernels.resolve_scale(scale, p.dim)
    if p.length == 0 or p.key_length == 0:
        out, lse = _kernels.empty_result(p)
        return (out, lse) if return_lse else out
    indices = _indices(p, check_positive_int("block_size", block_size), check_positive_int("top_k", top_k), scale, alignment)
    causal_mask = [] if alignment is None else [_causal(alignment, p.length, p.key_length)]
    if implementation == "dense":
        out, lse = _kernels.dense(p, scale=scale, mask=[index_counts(p.xp, indices, p.key_length) > 0, *causal_mask])
    else:
        out, lse = _kernels.gather(p, indices, scale=scale, mask=causal_mask)
    return (out, lse) if return_lse else out


def _causal(alignment: str, length: int, key_length: int) -> Any:
    offset = causal_offset(alignment, length, key_length)
    return lambda rows, cols: cols <= rows + offset


def _pattern(q: Any, k: Any, v: Any, /, *, block_size: int, top_k: int, causal: bool | str = False,
             scale: float | None = None, compute_dtype: Any = None, **_: Any) -> Any:
    idx = block_topk_indices(q, k, block_size=block_size, top_k=top_k, causal=causal, scale=scale,
                             compute_dtype=compute_dtype)
    xp = namespace(idx)
    allowed = index_counts(xp, idx, int(k.shape[-2])) > 0
    alignment = parse_causal(causal)
    if alignment is not None:
        L, S = int(q.shape[-2]), int(k.shape[-2])
        rows = xp.reshape(xp.arange(L, dtype=xp.int64, device=idx.device), (L, 1))
        cols = xp.reshape(xp.arange(S, dtype=xp.int64, device=idx.device), (1, S))
        allowed = allowed & _causal(alignment, L, S)(rows, cols)
    return allowed


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    return block_topk_attention(q, k, v, **{**params, "implementation": "dense"})


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(heads=d["H"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    gqa = qkv(seed, kv_heads=d["G"], **shapes)
    self_attn = qkv(seed, kv_heads=d["G"], **{**shapes, "key_length": d["L"]})
    b = max(1, d["L"] // 2)
    return [
        Case("gqa", gqa, {"block_size": 2, "top_k": 2}, seed=seed),
        Case("causal", self_attn, {"block_size": 2, "top_k": 2, "causal": True}, seed=seed),
        Case("bottom_right", gqa, {"block_size": 3, "top_k": 1, "causal": "bottom_right"}, seed=seed),
        Case("all_blocks", gqa, {"block_size": b, "top_k": -(-d["S"] // b)}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    """MoBA-style causal selection: blocks of min(64, seq) keys, the 4 best blocks (own block included)."""
    block_size = min(64, seq)
    top_k = min(4, -(-seq // block_size))
    return Case("example", example_qkv(seq, heads, dim, seed), {"block_size": block_size, "top_k": top_k, "causal": True},
                seed=seed)


register(Mechanism(
    key="block_topk",
    function=block_topk_attention,
    family="C. content-sparse",
    paper="Lu et al. 2025, MoBA §2.2; Yuan et al. 2025, NSA §3.3.2 (selection branch)",
    params={
        "block_size": "key block size b",
        "top_k": "blocks per query, own block included (the catalogue's k)",
        "causal": "False | True | 'top_left' | 'bottom_right'",
        "scale": "score scale, default 1/sqrt(D)",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    pattern=_pattern,
    example=_example,
    vjp=_kernels.engine_vjp(block_topk_attention, selection_calls=True),
))
