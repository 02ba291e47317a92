"""Shaw et al. 2018 relative position representations: clipped relative embeddings on keys and values."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._patterns import mask_and_causal, relative_logits_term
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["relative_shaw_attention"]


def _check_table(p: _kernels.Prepared, name: str, table: Any, width: int, feature: int, feature_name: str) -> Any:
    heads = p.heads
    shape = tuple(int(n) for n in table.shape)
    if len(shape) not in (2, 3) or shape[-2:] != (width, feature) or (len(shape) == 3 and shape[0] not in (1, heads)):
        raise ValueError(f"{name} must have shape (2k+1, {feature_name}) = {(width, feature)} or (H, 2k+1, {feature_name}) "
                         f"with H = {heads}; got {shape}")
    return _kernels.check_array(p.xp, p.device, p.q.dtype, name, table)


@typed_options()
def relative_shaw_attention(q: Any, k: Any, v: Any, /, *, rel_k: Any, rel_v: Any = None, max_distance: int | None = None,
                            query_offset: int = 0, causal: bool | str = False, scale: float | None = None,
                            return_lse: bool = False, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Shaw relative positions: keys and values plus learned embeddings of the clipped distance j − i.

    .. math::

        s_{ij} = \\mathrm{scale}\\; q_i \\cdot \\big(k_j + a^K_{c(j-i)}\\big), \\qquad
        o_i = \\sum_j w_{ij}\\big(v_j + a^V_{c(j-i)}\\big), \\qquad
        w_{ij} = \\mathrm{softmax}_j(s_{ij}), \\quad c(r) = \\max(-k, \\min(k, r))

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)``, ``rel_k (2k+1, D)`` or
    ``(H, 2k+1, D)``, ``rel_v (2k+1, E)`` or ``(H, 2k+1, E)`` → ``(..., H, L, E)``. Row ``k + r`` of
    a table embeds the clipped distance r ∈ [−k, k].

    Args:
        rel_k: key embeddings a^K (the paper shares them across heads; per-head tables allowed).
        rel_v: value embeddings a^V; ``None`` = zeros (keys only, as many later variants).
        max_distance: k; default ``(rows − 1) / 2`` of ``rel_k``, and checked against it if given.
        query_offset: query i sits at position i + query_offset (distance j − i − query_offset).
        causal, scale, return_lse, compute_dtype, implementation: as :func:`reflex.full_attention`.

    The key term is an index-grid bias ``scale·q_i·a^K_{c(j−i)}`` (relative logits per tile; the
    tiled kernel never builds ``L × S``). The value term needs the weights summed per clipped
    distance, P_i(r): for |r| < k it is the single weight ``exp(s_{i,i+r} − lse_i)``; for r = ±k it
    is the weight of the whole tail, ``exp(lse_i^{tail} − lse_i)`` with the tail's lse from the
    engine under an extra band mask — O(L·k) memory, never ``L × S``. A fully masked row gives 0.

    Reference: Shaw, Uszkoreit & Vaswani 2018, "Self-Attention with Relative Position
    Representations", NAACL, §3 (eqs. 3–4 and the clipping of §3.2).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    rows_k = int(rel_k.shape[-2]) if rel_k.ndim >= 2 else -1
    if rows_k < 1 or rows_k % 2 == 0:
        raise ValueError(f"rel_k must have an odd number 2k+1 of rows (distances -k..k); got shape {tuple(rel_k.shape)}")
    clip = (rows_k - 1) // 2
    if max_distance is not None and max_distance != clip:
        raise ValueError(f"max_distance is {max_distance}; rel_k has {rows_k} rows, i.e. max_distance {clip}")
    rel_k = _check_table(p, "rel_k", rel_k, rows_k, p.dim, "D")
    if rel_v is not None:
        rel_v = _check_table(p, "rel_v", rel_v, rows_k, p.value_dim, "E")
    scale = _kernels.resolve_scale(scale, p.dim)
    masks, tile_active = mask_and_causal(p, None, causal)

    def embed(d_min: int, d_max: int) -> Any:
        distance = xp.arange(d_min, d_max + 1, dtype=xp.int64, device=p.device)
        return xp.take(rel_k, xp.clip(distance, min=-clip, max=clip) + clip, axis=-2)

    queries = p.q * scale
    bias = relative_logits_term(xp, queries, embed, query_offset)
    out, lse = _kernels.softmax_attention(p, scale=scale, mask=masks, bias=bias, tile_active=tile_active,
                                          implementation=implementation, return_lse=True)
    if rel_v is not None and p.length and p.key_length:
        out = out + _value_term(p, queries, rel_k, rel_v, clip, query_offset, lse, masks, bias, tile_active, scale, implementation)
    return (out, lse) if return_lse else out


def _value_term(p: Any, queries: Any, rel_k: Any, rel_v: Any, clip: int, offset: int, lse: Any, masks: list[Any],
                bias: Any, tile_active: Any, scale: float, implementation: str) -> Any:
    """Σ_r P_i(r) a^V_r with P_i(r) the attention weight on the keys at clipped distance r."""
    xp = p.xp
    empty = lse == -math.inf
    shift = xp.where(empty, 0.0, lse)
    rows = xp.arange(p.length, dtype=xp.int64, device=p.device)
    k_groups = xp.reshape(p.k, (*p.batch, p.kv_heads, 1, p.key_length, p.dim))
    q_groups = xp.reshape(queries, (*p.batch, p.kv_heads, p.group, p.length, p.dim))
    shares = []
    for r in range(-clip, clip + 1):
        if clip == 0:  # every key has clipped distance 0: the whole (non-empty) row
            shares.append(xp.where(empty, 0.0, xp.ones_like(lse)))
        elif abs(r) == clip:
            # the tail j − i − δ ≤ −k (or ≥ k): its share of the softmax mass, from the engine's lse
            if r < 0:
                tail = lambda rr, cc: cc - rr - offset <= -clip  # noqa: E731
            else:
                tail = lambda rr, cc: cc - rr - offset >= clip  # noqa: E731
            _, tail_lse = _kernels.softmax_attention(p, scale=scale, mask=[*masks, tail], bias=bias,
                                                     tile_active=tile_active, implementation=implementation,
                                                     return_lse=True)
            shares.append(xp.where(empty, 0.0, xp.exp(tail_lse - shift)))
        else:
            cols = rows + offset + r  # the one key at distance r of each query
            valid = (cols >= 0) & (cols < p.key_length)
            for m in masks:
                valid = valid & m(rows, cols)
            keys = xp.take(k_groups, xp.clip(cols, min=0, max=p.key_length - 1), axis=-2)  # (..., G, 1, L, D)
            content = xp.reshape(xp.sum(q_groups * keys, axis=-1), (*p.batch, p.heads, p.length))
            position = xp.sum(queries * rel_k[..., clip + r:clip + r + 1, :], axis=-1)  # q_i · a^K_r
            shares.append(xp.where(valid & ~empty, xp.exp(content + position - shift), 0.0))
    return xp.stack(shares, axis=-1) @ rel_v  # (..., H, L, 2k+1) @ (H|1, 2k+1, E)


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    gqa = qkv(seed, **shapes)
    rel_k = random.normal((5, d["D"]), seed=(seed, 5))
    rel_v = random.normal((5, d["E"]), seed=(seed, 6))
    per_head_k = random.normal((d["H"], 7, d["D"]), seed=(seed, 7))
    per_head_v = random.normal((d["H"], 7, d["E"]), seed=(seed, 8))
    return [
        Case("shared_tables", {**gqa, "rel_k": rel_k, "rel_v": rel_v}, {}, seed=seed),
        Case("causal", {**gqa, "rel_k": rel_k, "rel_v": rel_v}, {"causal": "bottom_right", "query_offset": d["S"] - d["L"]},
             seed=seed),
        Case("per_head_tables", {**gqa, "rel_k": per_head_k, "rel_v": per_head_v}, {}, seed=seed),
        Case("keys_only", {**gqa, "rel_k": rel_k}, {}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    """Shared key and value tables with clipping distance k = 16 (the paper's setting)."""
    rows = 2 * 16 + 1
    inputs = {**example_qkv(seq, heads, dim, seed),
              "rel_k": random.normal((rows, dim), seed=(seed, 3)),
              "rel_v": random.normal((rows, dim), seed=(seed, 4))}
    return Case("example", inputs, {}, seed=seed)


register(Mechanism(
    key="relative_shaw",
    function=relative_shaw_attention,
    family="H. positional biases and encodings",
    paper="Shaw, Uszkoreit & Vaswani 2018, NAACL, §3",
    params={
        "rel_k": "(2k+1, D) or (H, 2k+1, D) key embeddings of clipped distances -k..k",
        "rel_v": "(2k+1, E) or (H, 2k+1, E) value embeddings (None = zeros)",
        "max_distance": "clipping distance k (checked against the tables)",
        "query_offset": "query i sits at position i + query_offset",
        "causal": "False | True | 'top_left' | 'bottom_right'",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
))
