"""Kernel 3, gather: each query attends an explicit list of key indices (``-1`` = padding)."""

from __future__ import annotations

import math
from typing import Any

from reflex.backends import parallel_map
from reflex.mechanisms._engine.terms import (_as_tuple, _in_compute_dtype, _scores, _softmax_parts, empty_result,
                                             finish, guarded)
from reflex.mechanisms._inputs import Prepared

__all__ = ["gather", "GATHER_BLOCK_ELEMENTS"]

# Gathered keys and values per query block: at most this many elements (32 MiB in float64).
GATHER_BLOCK_ELEMENTS = 1 << 22


def gather(p: Prepared, indices: Any, *, scale: float, mask: Any = None, bias: Any = None,
           softcap: float | None = None, block_q: int | None = None) -> tuple[Any, Any]:
    """Attention of each query over its own key list ``indices (..., H, L, K)``; ``-1`` = padding.

    Mask and bias terms must be callables; they receive ``rows (l, 1)`` and the gathered key
    positions ``cols (..., H, l, K)``. A key listed twice counts twice in the softmax. Queries go
    in blocks of ``block_q`` (default: as many as keep the gathered keys and values of a block
    under ``GATHER_BLOCK_ELEMENTS``), on a thread per core for NumPy. Non-finite K or V entries
    reach only the rows that list them unmasked (:func:`~.terms.guarded`).
    """
    return guarded(p, lambda c: _gather(c, indices, scale=scale, mask=mask, bias=bias, softcap=softcap, block_q=block_q))


def _gather(p: Prepared, indices: Any, *, scale: float, mask: Any, bias: Any, softcap: float | None,
            block_q: int | None) -> tuple[Any, Any]:
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
