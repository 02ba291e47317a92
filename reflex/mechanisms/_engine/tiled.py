"""Kernel 2, tiled: online softmax over (query block, key tile) pairs; memory O(block_q · block_k) per head."""

from __future__ import annotations

import math
from typing import Any

from reflex.backends import is_plain_numpy, parallel_map
from reflex.mechanisms._engine.dense import _group_sum_product
from reflex.mechanisms._engine.extra import extend, extend_dropout
from reflex.mechanisms._engine.record import record
from reflex.mechanisms._engine.window import restrict, restrict_dropout
from reflex.mechanisms._engine.terms import (Gradients, TermGradient, TileActive, _as_tuple, _evaluate, _grids,
                                             _group_queries, _safe_max, _scores, _ungroup, block_backward, cotangents,
                                             empty_result, finish, guarded, guarded_backward, probabilities,
                                             zero_gradients)
from reflex.mechanisms._engine.dropout import Dropout, dropout_factor
from reflex.mechanisms._inputs import Prepared

__all__ = ["tiled", "tiled_backward", "BACKWARD_PARTS"]

# On NumPy the backward's query blocks are cut into at most this many contiguous parts, run on a
# thread each, with their own dK, dV accumulators (O(S·D) each) summed in part order at the end: the
# same bits on any machine (the parts do not depend on the core count). Other libraries run one
# part (their items run in order anyway), so one accumulator.
BACKWARD_PARTS = 4


def tiled(p: Prepared, *, scale: float, mask: Any = None, bias: Any = None, softcap: float | None = None,
          tile_active: TileActive | None = None, block_q: int = 128, block_k: int = 1024,
          dropout: Dropout | None = None) -> tuple[Any, Any]:
    """Online-softmax attention over (query block, key tile) pairs; same result as :func:`dense`.

    For each query block the running max ``m``, sum ``ℓ`` and accumulator are rescaled by
    ``exp(m_old − m_new)`` as each key tile arrives (Milakov & Gimelshein 2018; Dao 2022, Alg. 1).
    A tile is skipped when ``tile_active(i0, i1, j0, j1)`` is False or its mask tile is all False.
    Query blocks are independent; on NumPy they run on a thread per core (``parallel_map``).
    Non-finite K or V entries reach only the rows that attend them (:func:`~.terms.guarded`).
    ``dropout`` (:class:`~.dropout.Dropout`): each tile's weights are multiplied by ``M̃`` before the
    value product; the running max and sum (hence lse) stay undropped.

    On NumPy a tile whose mask tile has no True is skipped; on other libraries (CuPy, torch) only
    ``tile_active`` decides, on the host, since testing a device mask tile would synchronise once
    per tile (a fully masked tile computed anyway changes nothing: its weights are 0).
    """
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be positive; got {block_q}, {block_k}")
    mask, bias, softcap = extend("tiled", p, mask, bias, softcap)  # a caller's terms on any mechanism (extra.py)
    dropout = extend_dropout(p, dropout)  # a caller's dropout_mask/dropout_p on any mechanism (extra.py)
    dropout = restrict_dropout(p, dropout)  # its keep mask in the distributed window, if any (window.py)
    p, mask, bias, tile_active, _ = restrict(p, mask, bias, tile_active)  # a distributed window (window.py)
    options = dict(scale=scale, mask=mask, bias=bias, softcap=softcap, tile_active=tile_active, block_q=block_q,
                   block_k=block_k)
    if dropout is not None:
        options["dropout"] = dropout
    result = guarded(p, lambda c: _tiled(c, **options))
    record("tiled", p, options, result)
    return result


def _tiled(p: Prepared, *, scale: float, mask: Any, bias: Any, softcap: float | None, tile_active: TileActive | None,
           block_q: int, block_k: int, dropout: Dropout | None = None) -> tuple[Any, Any]:
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
            factor = dropout_factor(p, dropout, rows, cols, (i0, i1, j0, j1))
            if factor is not None:
                weights = weights * factor
            acc = rescale * acc + weights @ v[..., j0:j1, :]
            row_max = new_max
        return finish(xp, acc, row_max, row_sum)

    blocks = parallel_map(query_block, range(0, p.length, block_q), like=q_all)
    out = xp.concat([b[0] for b in blocks], axis=-2) if len(blocks) != 1 else blocks[0][0]
    lse = xp.concat([b[1] for b in blocks], axis=-1) if len(blocks) != 1 else blocks[0][1]
    return _ungroup(p, out), _ungroup(p, lse[..., None])[..., 0]


def tiled_backward(p: Prepared, out: Any, lse: Any, d_out: Any, d_lse: Any = None, *, scale: float, mask: Any = None,
                   bias: Any = None, softcap: float | None = None, tile_active: TileActive | None = None,
                   block_q: int | None = None, block_k: int | None = None,
                   dropout: Dropout | None = None) -> Gradients:
    """The VJP of :func:`tiled` at its result ``(out, lse)``; same equations as
    :func:`~reflex.mechanisms._engine.dense.dense_backward`, streamed (FlashAttention-2, Dao 2023,
    Alg. 2): per (query block, key tile) the probabilities are recomputed from the saved lse,
    ``P = exp(Z − lse)``, with ``D = rowsum(dO∘O) − dL`` computed once per row, so no ``L × S``
    array exists: memory O(block_q · block_k) per head plus one ``dK``, ``dV`` accumulator per part
    (:data:`BACKWARD_PARTS`). dQ of a query block is complete after its key tiles; dK, dV of a key
    tile are summed over query blocks in a fixed order (deterministic). The tiles skipped forward
    are skipped here. ``block_q``, ``block_k`` default to :func:`tiled`'s. Dropout as in
    :func:`~reflex.mechanisms._engine.dense.dense_backward`, per tile.
    """
    block_q = tiled.__kwdefaults__["block_q"] if block_q is None else block_q
    block_k = tiled.__kwdefaults__["block_k"] if block_k is None else block_k
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be positive; got {block_q}, {block_k}")
    if p.length == 0 or p.key_length == 0:
        return zero_gradients(p, bias)
    options = dict(scale=scale, mask=mask, bias=bias, softcap=softcap, tile_active=tile_active, block_q=block_q,
                   block_k=block_k, dropout=dropout)
    return guarded_backward(p, out, lse, d_out, d_lse, lambda c: _tiled(c, **options),
                            lambda c, o, l_, do, dl: _tiled_backward(c, o, l_, do, dl, **options))


def _tiled_backward(p: Prepared, out: Any, lse: Any, d_out: Any, d_lse: Any, *, scale: float, mask: Any, bias: Any,
                    softcap: float | None, tile_active: TileActive | None, block_q: int,
                    block_k: int, dropout: Dropout | None = None) -> Gradients:
    xp = p.xp
    masks, bias_terms = _as_tuple(mask), _as_tuple(bias)
    q_all = _group_queries(p, p.q)
    k = xp.expand_dims(p.k, axis=-3)
    v = xp.expand_dims(p.v, axis=-3)
    lse_all = _group_queries(p, lse[..., None])
    d_o_all, delta_all = cotangents(p, out, d_out, d_lse)
    host_masks = is_plain_numpy(p.q)
    starts = list(range(0, p.length, block_q))
    size = -(-len(starts) // (min(BACKWARD_PARTS, len(starts)) if host_masks else 1))
    parts = [starts[n:n + size] for n in range(0, len(starts), size)]
    key_starts = list(range(0, p.key_length, block_k))
    # Array biases with a row axis are written in disjoint row slices by the parts: one accumulator.
    shared = [TermGradient(p, t) for t in bias_terms]

    def part(block_starts: list[int]) -> tuple[list[Any], list[Any], list[Any], list[TermGradient]]:
        terms = [g if g.array and g.acc.shape[-2] != 1 else TermGradient(p, g.term) for g in shared]
        dk: list[Any] = [None] * len(key_starts)
        dv: list[Any] = [None] * len(key_starts)
        dqs = []
        for i0 in block_starts:
            i1 = min(i0 + block_q, p.length)
            q = q_all[..., i0:i1, :]
            row_lse, d_o, delta = lse_all[..., i0:i1, :], d_o_all[..., i0:i1, :], delta_all[..., i0:i1, :]
            dq = xp.zeros(q.shape, dtype=q.dtype, device=p.device)
            for t, j0 in enumerate(key_starts):
                j1 = min(j0 + block_k, p.key_length)
                tile = (i0, i1, j0, j1)
                if tile_active is not None and not tile_active(*tile):
                    continue
                rows, cols = _grids(p, *tile)
                tile_masks = _evaluate(p, masks, rows, cols, tile)
                if host_masks and any(not bool(xp.any(m)) for m in tile_masks):
                    continue
                k_tile, v_tile = k[..., j0:j1, :], v[..., j0:j1, :]
                ds, kept = block_backward(p, terms, rows, cols, tile, q, k_tile, v_tile, scale=scale, softcap=softcap,
                                          masks=tile_masks, lse=row_lse, d_o=d_o, delta=delta, dropout=dropout)
                dq = dq + ds @ k_tile
                dk_t, dv_t = _group_sum_product(p, ds, q), _group_sum_product(p, kept, d_o)
                dk[t] = dk_t if dk[t] is None else dk[t] + dk_t
                dv[t] = dv_t if dv[t] is None else dv[t] + dv_t
            dqs.append(scale * dq)
        return dqs, dk, dv, terms

    results = parallel_map(part, parts, like=q_all)
    dq = xp.concat([d for r in results for d in r[0]], axis=-2)
    tiles_k, tiles_v = [], []
    for t, j0 in enumerate(key_starts):
        j1 = min(j0 + block_k, p.key_length)
        for tiles, index, width in ((tiles_k, 1, p.dim), (tiles_v, 2, p.value_dim)):
            found = [r[index][t] for r in results if r[index][t] is not None]
            total = found[0] if found else xp.zeros((*p.batch, p.kv_heads, j1 - j0, width), dtype=p.q.dtype,
                                                    device=p.device)
            for x in found[1:]:
                total = total + x
            tiles.append(total)
    dk = scale * (xp.concat(tiles_k, axis=-2) if len(tiles_k) != 1 else tiles_k[0])
    dv = xp.concat(tiles_v, axis=-2) if len(tiles_v) != 1 else tiles_v[0]
    terms = results[0][3]
    for r in results[1:]:
        for g, other in zip(terms, r[3]):
            g.merge(other)
    return Gradients(_ungroup(p, dq), dk, dv, tuple(g.result() for g in terms))
