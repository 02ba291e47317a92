"""Shaw et al. 2018 relative position representations: clipped relative embeddings on keys and values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.backends import device as device_of
from reflex.mechanisms._patterns import mask_and_causal
from reflex.mechanisms._relative import RelativeLogits, assemble_rows
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._numerics import unbroadcast

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

    Gradients (:func:`reflex.vjp`), O(L·k) memory like the forward: the key term through the
    engine's backward (FlashAttention-2, Dao 2023, Alg. 2) with the relative-logits term's VJP
    (``dq̃_i = Σ_d dΛ_{id} a^K_d``, ``da^K_r = Σ_{i,d: c(d)=r} dΛ_{id} q̃_i``, q̃ = scale·q). The value
    term ``Σ_r w_{ir} a^V_r`` with ``w_i = softmax_r(ζ_i)`` (ζ the bin's score or tail lse):
    ``da^V_r = Σ_i w_{ir} dO_i``, ``dζ_{ir} = w_{ir}(g_{ir} − Σ_{r'} w_{ir'} g_{ir'})`` with
    ``g_{ir} = dO_i·a^V_r``; a tail's dζ is the lse cotangent of its engine call; a single key's
    goes to q̃_i (``k_j + a^K_r``), k_j and a^K_r (``q̃_i``).

    Reference: Shaw, Uszkoreit & Vaswani 2018, "Self-Attention with Relative Position
    Representations", NAACL, §3 (eqs. 3–4 and the clipping of §3.2).
    """
    f = _forward(q, k, v, rel_k=rel_k, rel_v=rel_v, max_distance=max_distance, query_offset=query_offset,
                 causal=causal, scale=scale, compute_dtype=compute_dtype, implementation=implementation)
    return (f.out, f.lse) if return_lse else f.out


@dataclass
class _Forward:
    """The forward's pieces, kept for the VJP: the key-term engine call's (out0, lse), the value
    term's shares P_i(r) (``None`` without rel_v) and the tails' lse per r = ±k."""

    p: Any
    queries: Any
    bias: Any
    masks: list[Any]
    clip: int
    offset: int
    scale: float
    rel_k: Any
    rel_v: Any
    out0: Any
    lse: Any
    shares: list[Any] | None = None
    tails: dict[int, Any] = field(default_factory=dict)
    out: Any = None


def _forward(q: Any, k: Any, v: Any, *, rel_k: Any, rel_v: Any, max_distance: int | None, query_offset: int,
             causal: bool | str, scale: float | None, compute_dtype: Any, implementation: str) -> _Forward:
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

    def index(d_min: int, d_max: int) -> Any:
        distance = xp.arange(d_min, d_max + 1, dtype=xp.int64, device=p.device)
        return xp.clip(distance, min=-clip, max=clip) + clip

    def embed(d_min: int, d_max: int) -> Any:
        return xp.take(rel_k, index(d_min, d_max), axis=-2)

    def embed_vjp(d_min: int, d_max: int, d_table: Any) -> dict[str, Any]:
        ids = xp.reshape(xp.arange(rows_k, dtype=xp.int64, device=p.device), (1, rows_k))
        one_hot = xp.astype(xp.reshape(index(d_min, d_max), (-1, 1)) == ids, d_table.dtype)  # (n, 2k+1)
        return {"rel_k": unbroadcast(xp, xp.matrix_transpose(one_hot) @ d_table, tuple(rel_k.shape))}

    queries = p.q * scale
    bias = RelativeLogits(xp, queries, embed, embed_vjp, query_offset)
    out0, lse = _kernels.softmax_attention(p, scale=scale, mask=masks, bias=bias, tile_active=tile_active,
                                           implementation=implementation, return_lse=True)
    f = _Forward(p, queries, bias, masks, clip, query_offset, scale, rel_k, rel_v, out0, lse, out=out0)
    if rel_v is not None and p.length and p.key_length:
        _value_term(f, tile_active, implementation)
        f.out = out0 + xp.stack(f.shares, axis=-1) @ rel_v  # (..., H, L, 2k+1) @ (H|1, 2k+1, E)
    return f


def _singles(f: _Forward, r: int) -> tuple[Any, Any, Any]:
    """For |r| < k: the key index j = i + δ + r of each query, whether it is a visible key, and the
    score ζ_{i,r} = q̃_i·k_j + q̃_i·a^K_r of that key (q̃ = scale·q)."""
    p, xp = f.p, f.p.xp
    rows = xp.arange(p.length, dtype=xp.int64, device=p.device)
    cols = rows + f.offset + r
    valid = (cols >= 0) & (cols < p.key_length)
    for m in f.masks:
        valid = valid & m(rows, cols)
    k_groups = xp.reshape(p.k, (*p.batch, p.kv_heads, 1, p.key_length, p.dim))
    q_groups = xp.reshape(f.queries, (*p.batch, p.kv_heads, p.group, p.length, p.dim))
    keys = xp.take(k_groups, xp.clip(cols, min=0, max=p.key_length - 1), axis=-2)  # (..., G, 1, L, D)
    content = xp.reshape(xp.sum(q_groups * keys, axis=-1), (*p.batch, p.heads, p.length))
    position = xp.sum(f.queries * f.rel_k[..., f.clip + r:f.clip + r + 1, :], axis=-1)  # q̃_i · a^K_r
    return cols, valid, content + position


def _value_term(f: _Forward, tile_active: Any, implementation: str) -> None:
    """The shares P_i(r): the attention weight on the keys at clipped distance r.

    Each bin's log-mass ζ_{ir} (a single key's score, or a tail's lse) is computed, then the shares
    are the max-shifted softmax of ζ over the 2k+1 bins — equal to e^{ζ − lse} in exact arithmetic
    (the bins partition the row), but self-consistent (they sum to 1) and free of overflow when the
    scores are huge: ζ and the engine's lse come from differently rounded products, and at |s| ~ 1e16
    their difference alone is O(1) (a raw e^{ζ − lse} then overflows).
    """
    p, xp, clip, offset = f.p, f.p.xp, f.clip, f.offset
    empty = f.lse == -math.inf
    logs = []
    for r in range(-clip, clip + 1):
        if clip == 0:  # every key has clipped distance 0: the whole (non-empty) row
            logs.append(f.lse)
        elif abs(r) == clip:
            # the tail j − i − δ ≤ −k (or ≥ k): its share of the softmax mass, from the engine's lse
            if r < 0:
                tail = lambda rr, cc: cc - rr - offset <= -clip  # noqa: E731
            else:
                tail = lambda rr, cc: cc - rr - offset >= clip  # noqa: E731
            _, tail_lse = _kernels.softmax_attention(p, scale=f.scale, mask=[*f.masks, tail], bias=f.bias,
                                                     tile_active=tile_active, implementation=implementation,
                                                     return_lse=True)
            f.tails[r] = tail_lse
            logs.append(tail_lse)
        else:
            _, valid, score = _singles(f, r)
            logs.append(xp.where(valid, score, -math.inf))
    zeta = xp.stack(logs, axis=-1)  # (..., H, L, 2k+1)
    top = xp.max(zeta, axis=-1, keepdims=True)
    weights = xp.exp(zeta - xp.where(top == -math.inf, 0.0, top))
    total = xp.sum(weights, axis=-1, keepdims=True)
    shares = xp.where(empty[..., None], 0.0, weights / xp.where(total == 0, 1.0, total))
    f.shares = [shares[..., i] for i in range(2 * clip + 1)]


def _shifted_rows(xp: Any, x: Any, shift: int, length: int) -> Any:
    """``y[..., j, :] = x[..., j − shift, :]`` for j in [0, length) (zero where j − shift is outside x)."""
    rows, width = int(x.shape[-2]), int(x.shape[-1])
    lo, hi = max(0, shift), min(length, rows + shift)
    if hi <= lo:
        return xp.zeros((*x.shape[:-2], length, width), dtype=x.dtype, device=device_of(x))
    parts = [xp.zeros((*x.shape[:-2], lo, width), dtype=x.dtype, device=device_of(x)), x[..., lo - shift:hi - shift, :],
             xp.zeros((*x.shape[:-2], length - hi, width), dtype=x.dtype, device=device_of(x))]
    return xp.concat(parts, axis=-2)


def _add(total: dict[str, Any], part: dict[str, Any]) -> None:
    for name, g in part.items():
        total[name] = g if name not in total else total[name] + g


def _vjp(inputs: Any, d_out: Any, *, d_lse: Any = None, max_distance: int | None = None, query_offset: int = 0,
         causal: bool | str = False, scale: float | None = None, compute_dtype: Any = None,
         implementation: str = "auto", return_lse: bool = False) -> dict[str, Any]:
    """Gradients of ``⟨d_out, O⟩ + ⟨d_lse, lse⟩`` for q, k, v, rel_k and rel_v (equations in the docstring)."""
    from reflex.mechanisms._engine.record import recording

    if implementation not in ("dense", "tiled"):
        implementation = "dense" if int(inputs["q"].shape[-2]) * int(inputs["k"].shape[-2]) <= 1 << 20 else "tiled"
    with recording() as calls:
        f = _forward(inputs["q"], inputs["k"], inputs["v"], rel_k=inputs["rel_k"], rel_v=inputs.get("rel_v"),
                     max_distance=max_distance, query_offset=query_offset, causal=causal, scale=scale,
                     compute_dtype=compute_dtype, implementation=implementation)
    p, xp = f.p, f.p.xp
    d_out = xp.astype(d_out, p.q.dtype)
    d_lse = None if d_lse is None else xp.astype(d_lse, p.q.dtype)
    main = next(c for c in calls if c.out is f.out0)
    grads: dict[str, Any] = {}
    d_k_extra = None
    if f.shares is not None:
        shares = xp.stack(f.shares, axis=-1)  # (..., H, L, 2k+1)
        grads["rel_v"] = unbroadcast(xp, xp.matrix_transpose(shares) @ d_out, tuple(f.rel_v.shape))
        if f.clip > 0:
            # O += Σ_r w_ir a^V_r with w_i = softmax_r(ζ_i): dζ_ir = w_ir·(g_ir − Σ_r' w_ir' g_ir'), g_ir = dO_i·a^V_r
            g_bins = d_out @ xp.matrix_transpose(f.rel_v)
            d_zeta = shares * (g_bins - xp.sum(shares * g_bins, axis=-1, keepdims=True))
            for r, tail_lse in f.tails.items():
                call = next(c for c in calls if c.lse is tail_lse)
                g = call.backward(xp.zeros(d_out.shape, dtype=p.q.dtype, device=p.device), d_zeta[..., f.clip + r])
                _add(grads, {"dq": g.dq, "dk": g.dk, **g.bias[0]})
            d_k_extra = xp.zeros(p.k.shape, dtype=p.q.dtype, device=p.device)
            d_queries = xp.zeros(f.queries.shape, dtype=p.q.dtype, device=p.device)
            d_rel_k = xp.zeros(f.rel_k.shape, dtype=p.q.dtype, device=p.device)
            for r in range(-f.clip + 1, f.clip):
                cols, valid, _ = _singles(f, r)
                dz = xp.where(valid, d_zeta[..., f.clip + r], 0.0)[..., None]  # (..., H, L, 1)
                keys = xp.take(p.k, xp.clip(cols, min=0, max=p.key_length - 1), axis=-2)  # (..., G, L, D)
                keys = xp.reshape(xp.expand_dims(keys, axis=-3), (*keys.shape[:-3], p.kv_heads, 1, p.length, p.dim))
                a_k = f.rel_k[..., f.clip + r:f.clip + r + 1, :]  # (H|1, 1, D)
                grouped = xp.reshape(dz, (*p.batch, p.kv_heads, p.group, p.length, 1))
                d_queries = d_queries + xp.reshape(grouped * keys, f.queries.shape) + dz * a_k
                to_keys = xp.sum(grouped * xp.reshape(f.queries, grouped.shape[:-1] + (p.dim,)), axis=-3)  # (..., G, L, D)
                d_k_extra = d_k_extra + _shifted_rows(xp, to_keys, f.offset + r, p.key_length)
                d_a = unbroadcast(xp, xp.sum(dz * f.queries, axis=-2, keepdims=True), tuple(a_k.shape))
                d_rel_k = d_rel_k + xp.concat(
                    [xp.zeros((*d_a.shape[:-2], f.clip + r, p.dim), dtype=p.q.dtype, device=p.device), d_a,
                     xp.zeros((*d_a.shape[:-2], f.clip - r, p.dim), dtype=p.q.dtype, device=p.device)], axis=-2)
            _add(grads, {"singles_queries": d_queries, "rel_k": d_rel_k})
    g = main.backward(d_out, d_lse)
    _add(grads, {"dq": g.dq, "dk": g.dk, **g.bias[0]})
    d_queries = assemble_rows(xp, grads, f.queries)
    if "singles_queries" in grads:
        d_queries = d_queries + grads["singles_queries"]
    d_k = grads["dk"] if d_k_extra is None else grads["dk"] + d_k_extra
    result = {"q": grads["dq"] + f.scale * d_queries, "k": d_k, "v": g.dv,
              "rel_k": grads.get("rel_k", xp.zeros(f.rel_k.shape, dtype=p.q.dtype, device=p.device))}
    if inputs.get("rel_v") is not None:
        result["rel_v"] = grads.get("rel_v", xp.zeros(f.rel_v.shape, dtype=p.q.dtype, device=p.device))
    return result


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
    vjp=_vjp,
))
