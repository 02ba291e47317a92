"""Kernel 2, tiled: online softmax over (query block, key tile) pairs; memory O(block_q · block_k) per head."""

from __future__ import annotations

import math
from typing import Any

from reflex.backends import is_plain_numpy, parallel_map
from reflex.mechanisms._engine.terms import (TileActive, _as_tuple, _evaluate, _grids, _group_queries, _safe_max,
                                             _scores, _ungroup, empty_result, finish, guarded)
from reflex.mechanisms._inputs import Prepared

__all__ = ["tiled"]


def tiled(p: Prepared, *, scale: float, mask: Any = None, bias: Any = None, softcap: float | None = None,
          tile_active: TileActive | None = None, block_q: int = 128, block_k: int = 1024) -> tuple[Any, Any]:
    """Online-softmax attention over (query block, key tile) pairs; same result as :func:`dense`.

    For each query block the running max ``m``, sum ``ℓ`` and accumulator are rescaled by
    ``exp(m_old − m_new)`` as each key tile arrives (Milakov & Gimelshein 2018; Dao 2022, Alg. 1).
    A tile is skipped when ``tile_active(i0, i1, j0, j1)`` is False or its mask tile is all False.
    Query blocks are independent; on NumPy they run on a thread per core (``parallel_map``).
    Non-finite K or V entries reach only the rows that attend them (:func:`~.terms.guarded`).

    On NumPy a tile whose mask tile has no True is skipped; on other libraries (CuPy, torch) only
    ``tile_active`` decides, on the host, since testing a device mask tile would synchronise once
    per tile (a fully masked tile computed anyway changes nothing: its weights are 0).
    """
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be positive; got {block_q}, {block_k}")
    return guarded(p, lambda c: _tiled(c, scale=scale, mask=mask, bias=bias, softcap=softcap, tile_active=tile_active,
                                       block_q=block_q, block_k=block_k))


def _tiled(p: Prepared, *, scale: float, mask: Any, bias: Any, softcap: float | None, tile_active: TileActive | None,
           block_q: int, block_k: int) -> tuple[Any, Any]:
    xp = p.xp
    if p.length == 0 or p.key_length == 0:
        return empty_result(p)
    masks, biases = _as_tuple(mask), _as_tuple(bias)
    q_all = _group_queries(p, p.q * scale)
    host_masks = is_plain_numpy(p.q)
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
            if host_masks and any(not bool(xp.any(m)) for m in tile_masks):
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
