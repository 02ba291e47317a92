"""The shared engine: dense, tiled and gather softmax attention on the array API.

Most mechanisms are softmax attention over a restricted or re-weighted set of (query, key) pairs.
They compile to three kernels that share one set of semantics:

.. math::

    s_{ij} = \\mathrm{cap}(\\mathrm{scale}\\; q_i \\cdot k_j) + \\sum b_{ij}, \\qquad
    s_{ij} = -\\infty \\text{ where any mask is False},

    o_i = \\sum_j \\frac{e^{s_{ij} - m_i}}{\\ell_i} v_j, \\quad m_i = \\max_j s_{ij},\\quad
    \\ell_i = \\sum_j e^{s_{ij} - m_i},\\quad \\mathrm{lse}_i = m_i + \\log \\ell_i,

with ``cap(x) = c·tanh(x/c)`` when a softcap ``c`` is given. Conventions decided here:

- Softmax is max-shifted. A row whose every score is −∞ (fully masked) outputs 0 and lse −∞;
  no NaN is produced (the shift uses 0 when the row max is −∞, and ℓ = 0 divides as 1).
- Boolean masks: True = attend. Several masks are ANDed; several biases are added.
- Arithmetic runs in the dtype of the prepared q, k, v (float64 unless ``compute_dtype`` says
  otherwise); nothing here names a dtype, so ``numpy.longdouble`` works on the dense path.
- GQA: query head ``h`` uses key/value head ``h // (H // G)`` (repeat-interleave, as torch
  ``enable_gqa`` and ONNX Attention). Kernels work on the grouped view ``(..., G, H/G, L, D)``
  against ``(..., G, 1, S, D)``, so key/value heads are never copied.

Masks and biases are *terms*: either an array broadcastable to ``(..., H, L, S)``, or a function
``term(rows, cols)`` of integer index grids (``rows`` of shape ``(l, 1)``, ``cols`` of shape
``(1, s)`` — or, in the gather kernel, the gathered key indices ``(..., H, l, K)``) returning an
array broadcastable to ``(..., H, l, s)``: a vectorised FlexAttention ``mask_mod``/``score_mod``.
Scores themselves are never hidden inside a term, so biases stay separate, differentiable inputs.

Inputs are validated and cast by :mod:`reflex.mechanisms._inputs` (re-exported here:
:func:`prepare`, :func:`check_term`, :func:`check_indices`, :func:`resolve_scale`, ...).

Kernels:
1. :func:`dense` — materialises ``(..., H, L, S)``. The definition of truth for small sizes.
   :func:`scores` and :func:`weights` return its score and probability maps.
2. :func:`tiled` — the same semantics streamed over (query block, key tile) pairs with an online
   softmax (running max and sum, Dao 2022, Alg. 1). Tiles that ``tile_active`` rules out, or whose
   mask tile has no True, are skipped. Memory O(block_q · block_k) per head; never ``L × S``.
3. :func:`gather` — each query attends an explicit list of key indices (``-1`` = padding;
   duplicates count once per occurrence), in query blocks.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from reflex.backends import parallel_map
from reflex.mechanisms._inputs import (Prepared, check_array, check_indices, check_term, prepare, resolve_dtype,
                                       resolve_scale, resolve_softcap)

__all__ = [
    "Prepared", "prepare", "check_term", "check_indices", "check_array", "dense", "tiled", "gather", "finish", "empty_result",
    "softmax_attention", "resolve_dtype", "resolve_scale", "resolve_softcap", "IMPLEMENTATIONS", "scores", "weights",
]

Term = Any  # an array broadcastable to (..., H, L, S), or a callable (rows, cols) -> such an array
TileActive = Callable[[int, int, int, int], bool]


# --- grouped views -------------------------------------------------------------------------------

def _group_queries(p: Prepared, x: Any) -> Any:
    """``(..., H, l, ·)`` → ``(..., G, H/G, l, ·)``."""
    return p.xp.reshape(x, (*x.shape[:-3], p.kv_heads, p.group, *x.shape[-2:]))


def _ungroup(p: Prepared, x: Any) -> Any:
    """``(..., G, H/G, l, ·)`` → ``(..., H, l, ·)``."""
    return p.xp.reshape(x, (*x.shape[:-4], p.heads, *x.shape[-2:]))


def _group_term(p: Prepared, t: Any) -> Any:
    """A term value broadcastable to ``(..., H, l, s)`` → broadcastable to ``(..., G, H/G, l, s)``."""
    xp = p.xp
    full_ndim = len(p.batch) + 3
    if t.ndim > full_ndim:
        raise ValueError(f"a mask/bias term has {t.ndim} axes; at most {full_ndim} (..., H, L, S) are allowed")
    t = xp.reshape(t, (1,) * (full_ndim - t.ndim) + tuple(t.shape))
    if t.shape[-3] == 1:
        return xp.expand_dims(t, axis=-3)
    if t.shape[-3] != p.heads:
        raise ValueError(f"a mask/bias term has {t.shape[-3]} heads; expected 1 or {p.heads}")
    return xp.reshape(t, (*t.shape[:-3], p.kv_heads, p.group, *t.shape[-2:]))


def _slice_tile(t: Any, i0: int, i1: int, j0: int, j1: int) -> Any:
    """Rows i0:i1 and columns j0:j1 of a grouped array term, leaving broadcast (size-1) axes alone."""
    rows = slice(i0, i1) if t.shape[-2] != 1 else slice(None)
    cols = slice(j0, j1) if t.shape[-1] != 1 else slice(None)
    return t[..., rows, cols]


def _in_compute_dtype(p: Prepared, value: Any) -> Any:
    """A callable term's value: float values cast to the compute dtype (boolean masks unchanged)."""
    xp = p.xp
    if xp.isdtype(value.dtype, "real floating") and value.dtype != p.q.dtype:
        return xp.astype(value, p.q.dtype)
    return value


def _evaluate(p: Prepared, terms: Sequence[Any], rows: Any, cols: Any, tile: tuple[int, int, int, int] | None) -> list[Any]:
    """Grouped values of ``terms`` on the index grids ``rows``, ``cols`` (or an array tile)."""
    values = []
    for t in terms:
        if t is None:
            continue
        if callable(t) and not hasattr(t, "shape"):
            values.append(_group_term(p, _in_compute_dtype(p, t(rows, cols))))
        else:  # group first: an array of fewer than 2 axes ((S,), 0-d) has no row/column axis to slice
            value = _group_term(p, t)
            values.append(value if tile is None else _slice_tile(value, *tile))
    return values


def _grids(p: Prepared, i0: int, i1: int, j0: int, j1: int) -> tuple[Any, Any]:
    xp = p.xp
    rows = xp.reshape(xp.arange(i0, i1, dtype=xp.int64, device=p.device), (i1 - i0, 1))
    cols = xp.reshape(xp.arange(j0, j1, dtype=xp.int64, device=p.device), (1, j1 - j0))
    return rows, cols


def _as_tuple(terms: Any) -> tuple[Any, ...]:
    if terms is None:
        return ()
    return tuple(terms) if isinstance(terms, (tuple, list)) else (terms,)


# --- the score block, shared by every kernel -----------------------------------------------------

def _scores(p: Prepared, raw: Any, softcap: float | None, biases: list[Any], masks: list[Any]) -> Any:
    """Final scores from raw ``scale·q·k``: softcap, then biases, then masks (→ −∞)."""
    xp = p.xp
    s = raw  # a fresh temporary: updated in place below (saves a pass of page faults per tile)
    if softcap is not None:
        s = softcap * xp.tanh(s / softcap)
    for b in biases:
        s += b
    for m in masks:
        s = xp.where(m, s, -math.inf)
    return s


def _safe_max(xp: Any, m: Any) -> Any:
    """The softmax shift: the row max, or 0 where the row max is −∞ (nothing to attend)."""
    return xp.where(m == -math.inf, 0.0, m)


def empty_result(p: Prepared) -> tuple[Any, Any]:
    """The result when L = 0 or S = 0: zero outputs and −∞ lse (every row attends nothing)."""
    xp = p.xp
    out = xp.zeros((*p.batch, p.heads, p.length, p.value_dim), dtype=p.q.dtype, device=p.device)
    lse = xp.full((*p.batch, p.heads, p.length), -math.inf, dtype=p.q.dtype, device=p.device)
    return out, lse


def finish(xp: Any, acc: Any, row_max: Any, row_sum: Any) -> tuple[Any, Any]:
    """``(out, lse)`` from an unnormalised accumulator: out = acc / ℓ (0 when ℓ = 0), lse = m + log ℓ (−∞ when ℓ = 0)."""
    empty = row_sum == 0
    denom = xp.where(empty, 1.0, row_sum)
    out = acc / denom
    lse = xp.where(empty, -math.inf, row_max + xp.log(denom))
    return out, lse[..., 0]


# --- 1. dense ------------------------------------------------------------------------------------

def _dense_scores(p: Prepared, *, scale: float, mask: Any, bias: Any, softcap: float | None) -> Any:
    """Grouped final scores ``(..., G, H/G, L, S)`` (softcap, biases, masks → −∞)."""
    xp = p.xp
    rows, cols = _grids(p, 0, p.length, 0, p.key_length)
    masks = _evaluate(p, _as_tuple(mask), rows, cols, None)
    biases = _evaluate(p, _as_tuple(bias), rows, cols, None)
    q = _group_queries(p, p.q * scale)
    return _scores(p, q @ xp.matrix_transpose(xp.expand_dims(p.k, axis=-3)), softcap, biases, masks)


def _softmax_parts(xp: Any, s: Any) -> tuple[Any, Any, Any]:
    """Unnormalised weights ``exp(s − m)``, the row max ``m`` and the row sum ``ℓ`` of scores ``s``."""
    row_max = xp.max(s, axis=-1, keepdims=True)
    s -= _safe_max(xp, row_max)
    weights = xp.exp(s)
    return weights, row_max, xp.sum(weights, axis=-1, keepdims=True)


def dense(p: Prepared, *, scale: float, mask: Any = None, bias: Any = None, softcap: float | None = None) -> tuple[Any, Any]:
    """Dense masked softmax attention: ``(out (..., H, L, E), lse (..., H, L))``."""
    xp = p.xp
    if p.length == 0 or p.key_length == 0:
        return empty_result(p)
    s = _dense_scores(p, scale=scale, mask=mask, bias=bias, softcap=softcap)
    weights, row_max, row_sum = _softmax_parts(xp, s)
    out, lse = finish(xp, weights @ xp.expand_dims(p.v, axis=-3), row_max, row_sum)
    return _ungroup(p, out), _ungroup(p, lse[..., None])[..., 0]


def scores(p: Prepared, *, scale: float, mask: Any = None, bias: Any = None, softcap: float | None = None) -> Any:
    """The final scores ``(..., H, L, S)`` the dense kernel normalises: ``scale·q·kᵀ`` with no terms.

    For mechanisms that mix, select from or return score maps (talking heads, top-k, RealFormer).
    """
    return _ungroup(p, _dense_scores(p, scale=scale, mask=mask, bias=bias, softcap=softcap))


def weights(p: Prepared, *, scale: float, mask: Any = None, bias: Any = None, softcap: float | None = None) -> Any:
    """The dense kernel's softmax probabilities ``(..., H, L, S)``; a fully masked row is all 0.

    For mechanisms that multiply or reuse attention maps (Nyström, clustered, predictive).
    """
    xp = p.xp
    if p.length == 0 or p.key_length == 0:
        return xp.zeros(p.score_shape, dtype=p.q.dtype, device=p.device)
    unnormalised, _, row_sum = _softmax_parts(xp, _dense_scores(p, scale=scale, mask=mask, bias=bias, softcap=softcap))
    return _ungroup(p, unnormalised / xp.where(row_sum == 0, 1.0, row_sum))


# --- 2. tiled ------------------------------------------------------------------------------------

def tiled(p: Prepared, *, scale: float, mask: Any = None, bias: Any = None, softcap: float | None = None,
          tile_active: TileActive | None = None, block_q: int = 128, block_k: int = 1024) -> tuple[Any, Any]:
    """Online-softmax attention over (query block, key tile) pairs; same result as :func:`dense`.

    For each query block the running max ``m``, sum ``ℓ`` and accumulator are rescaled by
    ``exp(m_old − m_new)`` as each key tile arrives (Milakov & Gimelshein 2018; Dao 2022, Alg. 1).
    A tile is skipped when ``tile_active(i0, i1, j0, j1)`` is False or its mask tile is all False.
    Query blocks are independent; on NumPy they run on a thread per core (``parallel_map``).
    """
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be positive; got {block_q}, {block_k}")
    xp = p.xp
    if p.length == 0 or p.key_length == 0:
        return empty_result(p)
    masks, biases = _as_tuple(mask), _as_tuple(bias)
    q_all = _group_queries(p, p.q * scale)
    k = xp.expand_dims(p.k, axis=-3)
    v = xp.expand_dims(p.v, axis=-3)

    def query_block(i0: int) -> tuple[Any, Any]:
        i1 = min(i0 + block_q, p.length)
        q = q_all[..., i0:i1, :]
        stat_shape = (*q.shape[:-1], 1)
        row_max = xp.full(stat_shape, -math.inf, dtype=q.dtype, device=p.device)
        row_sum = xp.zeros(stat_shape, dtype=q.dtype, device=p.device)
        acc = xp.zeros((*q.shape[:-1], p.value_dim), dtype=q.dtype, device=p.device)
        for j0 in range(0, p.key_length, block_k):
            j1 = min(j0 + block_k, p.key_length)
            if tile_active is not None and not tile_active(i0, i1, j0, j1):
                continue
            rows, cols = _grids(p, i0, i1, j0, j1)
            tile_masks = _evaluate(p, masks, rows, cols, (i0, i1, j0, j1))
            if any(not bool(xp.any(m)) for m in tile_masks):
                continue
            tile_biases = _evaluate(p, biases, rows, cols, (i0, i1, j0, j1))
            s = _scores(p, q @ xp.matrix_transpose(k[..., j0:j1, :]), softcap, tile_biases, tile_masks)
            new_max = xp.maximum(row_max, xp.max(s, axis=-1, keepdims=True))
            shift = _safe_max(xp, new_max)
            rescale = xp.exp(row_max - shift)
            s -= shift
            weights = xp.exp(s)
            row_sum = rescale * row_sum + xp.sum(weights, axis=-1, keepdims=True)
            acc = rescale * acc + weights @ v[..., j0:j1, :]
            row_max = new_max
        return finish(xp, acc, row_max, row_sum)

    blocks = parallel_map(query_block, range(0, p.length, block_q), like=q_all)
    out = xp.concat([b[0] for b in blocks], axis=-2) if len(blocks) != 1 else blocks[0][0]
    lse = xp.concat([b[1] for b in blocks], axis=-1) if len(blocks) != 1 else blocks[0][1]
    return _ungroup(p, out), _ungroup(p, lse[..., None])[..., 0]


# --- 3. gather -----------------------------------------------------------------------------------

# Gathered keys and values per query block: at most this many elements (32 MiB in float64).
GATHER_BLOCK_ELEMENTS = 1 << 22


def gather(p: Prepared, indices: Any, *, scale: float, mask: Any = None, bias: Any = None,
           softcap: float | None = None, block_q: int | None = None) -> tuple[Any, Any]:
    """Attention of each query over its own key list ``indices (..., H, L, K)``; ``-1`` = padding.

    Mask and bias terms must be callables; they receive ``rows (l, 1)`` and the gathered key
    positions ``cols (..., H, l, K)``. A key listed twice counts twice in the softmax. Queries go
    in blocks of ``block_q`` (default: as many as keep the gathered keys and values of a block
    under ``GATHER_BLOCK_ELEMENTS``), on a thread per core for NumPy.
    """
    xp = p.xp
    if p.length == 0 or p.key_length == 0:  # S = 0: every index is padding, every row attends nothing
        return empty_result(p)
    masks, biases = _as_tuple(mask), _as_tuple(bias)
    for t in (*masks, *biases):
        if hasattr(t, "shape") or not callable(t):
            raise TypeError("gather takes masks and biases as callables of (rows, cols), not arrays")
    count = int(indices.shape[-1])
    full_ndim = len(p.batch) + 3
    idx = xp.reshape(indices, (1,) * (full_ndim - indices.ndim) + tuple(indices.shape))
    idx = xp.broadcast_to(idx, (*p.batch, p.heads, p.length, count))
    batch_size = math.prod(p.batch)
    # Flat row of key (b, g, j) in k reshaped to (B·G·S, D): (b·G + g)·S + j, with g = h // (H/G).
    batch_offset = xp.reshape(xp.arange(batch_size, dtype=xp.int64, device=p.device) * (p.kv_heads * p.key_length),
                              (*p.batch, 1, 1, 1))
    head_offset = xp.reshape((xp.arange(p.heads, dtype=xp.int64, device=p.device) // p.group) * p.key_length,
                             (p.heads, 1, 1))
    k_flat = xp.reshape(p.k, (batch_size * p.kv_heads * p.key_length, p.dim))
    v_flat = xp.reshape(p.v, (batch_size * p.kv_heads * p.key_length, p.value_dim))
    q_all = p.q * scale
    if block_q is None:
        per_query = max(1, math.prod(p.batch) * p.heads * count * (p.dim + p.value_dim))
        block_q = max(1, GATHER_BLOCK_ELEMENTS // per_query)

    def query_block(i0: int) -> tuple[Any, Any]:
        i1 = min(i0 + block_q, p.length)
        cols = idx[..., i0:i1, :]
        valid = cols >= 0
        flat = xp.reshape(xp.where(valid, cols, 0) + batch_offset + head_offset, (-1,))
        block_shape = (*p.batch, p.heads, i1 - i0, count)
        keys = xp.reshape(xp.take(k_flat, flat, axis=0), (*block_shape, p.dim))
        values = xp.reshape(xp.take(v_flat, flat, axis=0), (*block_shape, p.value_dim))
        rows = xp.reshape(xp.arange(i0, i1, dtype=xp.int64, device=p.device), (i1 - i0, 1))
        raw = xp.vecdot(xp.expand_dims(q_all[..., i0:i1, :], axis=-2), keys, axis=-1)
        tile_masks = [valid] + [t(rows, cols) for t in masks]
        s = _scores(p, raw, softcap, [_in_compute_dtype(p, t(rows, cols)) for t in biases], tile_masks)
        if count == 0:
            empty = xp.zeros((*block_shape[:-1], 1), dtype=raw.dtype, device=p.device)
            return finish(xp, xp.zeros((*block_shape[:-1], p.value_dim), dtype=raw.dtype, device=p.device), empty, empty)
        weights, row_max, row_sum = _softmax_parts(xp, s)
        return finish(xp, (xp.expand_dims(weights, axis=-2) @ values)[..., 0, :], row_max, row_sum)

    blocks = parallel_map(query_block, range(0, p.length, block_q), like=q_all)
    out = xp.concat([b[0] for b in blocks], axis=-2) if len(blocks) != 1 else blocks[0][0]
    lse = xp.concat([b[1] for b in blocks], axis=-1) if len(blocks) != 1 else blocks[0][1]
    return out, lse


# --- choosing a kernel ---------------------------------------------------------------------------

IMPLEMENTATIONS = ("auto", "dense", "tiled")
# "auto" streams when one head's score matrix would exceed this many elements (128 MiB in float64).
AUTO_TILED_ELEMENTS = 1 << 24


def softmax_attention(p: Prepared, *, scale: float, mask: Any = None, bias: Any = None, softcap: float | None = None,
                      tile_active: TileActive | None = None, implementation: str = "auto",
                      return_lse: bool = False) -> Any:
    """Run :func:`dense` or :func:`tiled` as ``implementation`` says; ``out`` or ``(out, lse)``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}")
    if implementation == "auto":
        implementation = "tiled" if p.length * p.key_length > AUTO_TILED_ELEMENTS else "dense"
    if implementation == "dense":
        out, lse = dense(p, scale=scale, mask=mask, bias=bias, softcap=softcap)
    else:
        out, lse = tiled(p, scale=scale, mask=mask, bias=bias, softcap=softcap, tile_active=tile_active)
    return (out, lse) if return_lse else out
