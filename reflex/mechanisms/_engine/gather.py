"""Kernel 3, gather: each query attends an explicit list of key indices (``-1`` = padding)."""

from __future__ import annotations

import math
from typing import Any

from reflex.backends import parallel_map
from reflex.mechanisms._engine.extra import extend, extend_dropout
from reflex.mechanisms._engine.record import record
from reflex.mechanisms._engine.window import restrict, restrict_dropout
from reflex.mechanisms._engine.dropout import Dropout, gathered_dropout_factor
from reflex.mechanisms._engine.terms import (Gradients, TermGradient, _as_tuple, _in_compute_dtype, _scores,
                                             _softmax_parts, capped_scores, empty_result, finish, guarded,
                                             guarded_backward, probabilities, zero_gradients)
from reflex.mechanisms._inputs import Prepared

__all__ = ["gather", "gather_backward", "GATHER_BLOCK_ELEMENTS"]

# Gathered keys and values per query block: at most this many elements (32 MiB in float64).
GATHER_BLOCK_ELEMENTS = 1 << 22


def gather(p: Prepared, indices: Any, *, scale: float, mask: Any = None, bias: Any = None,
           softcap: float | None = None, block_q: int | None = None,
           dropout: Dropout | None = None) -> tuple[Any, Any]:
    """Attention of each query over its own key list ``indices (..., H, L, K)``; ``-1`` = padding.

    Mask and bias terms must be callables; they receive ``rows (l, 1)`` and the gathered key
    positions ``cols (..., H, l, K)``. A key listed twice counts twice in the softmax. Queries go
    in blocks of ``block_q`` (default: as many as keep the gathered keys and values of a block
    under ``GATHER_BLOCK_ELEMENTS``), on a thread per core for NumPy. Non-finite K or V entries
    reach only the rows that list them unmasked (:func:`~.terms.guarded`). ``dropout``
    (:class:`~.dropout.Dropout`): its keep mask is read at the gathered key positions (an array at
    ``[..., h, i, idx]``, a callable with the gathered ``cols``); a key listed twice is kept or
    dropped twice alike.
    """
    mask, bias, softcap = extend("gather", p, mask, bias, softcap)  # a caller's terms on any mechanism (extra.py)
    dropout = extend_dropout(p, dropout)  # a caller's dropout_mask/dropout_p on any mechanism (extra.py)
    dropout = restrict_dropout(p, dropout)  # its keep mask in the distributed window, if any (window.py)
    p, mask, bias, _, indices = restrict(p, mask, bias, indices=indices)  # a distributed window (window.py)
    options = dict(scale=scale, mask=mask, bias=bias, softcap=softcap, block_q=block_q)
    if dropout is not None:
        options["dropout"] = dropout
    result = guarded(p, lambda c: _gather(c, indices, **options))
    record("gather", p, options, result, indices)
    return result


def _gather(p: Prepared, indices: Any, *, scale: float, mask: Any, bias: Any, softcap: float | None,
            block_q: int | None, dropout: Dropout | None = None) -> tuple[Any, Any]:
    xp = p.xp
    if p.length == 0 or p.key_length == 0:  # S = 0: every index is padding, every row attends nothing
        return empty_result(p)
    masks, biases = _as_tuple(mask), _as_tuple(bias)
    idx, count, batch_offset, head_offset, k_flat, v_flat, block_q = _layout(p, indices, masks, biases, block_q)
    q_all = p.q * scale

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
        factor = gathered_dropout_factor(p, dropout, rows, cols)
        if factor is not None:
            weights = weights * factor
        return finish(xp, (xp.expand_dims(weights, axis=-2) @ values)[..., 0, :], row_max, row_sum)

    blocks = parallel_map(query_block, range(0, p.length, block_q), like=q_all)
    out = xp.concat([b[0] for b in blocks], axis=-2) if len(blocks) != 1 else blocks[0][0]
    lse = xp.concat([b[1] for b in blocks], axis=-1) if len(blocks) != 1 else blocks[0][1]
    return out, lse


def _layout(p: Prepared, indices: Any, masks: tuple[Any, ...], biases: tuple[Any, ...],
            block_q: int | None) -> tuple[Any, int, Any, Any, Any, Any, int]:
    """Key lists broadcast to ``(..., H, L, K)``, K, the flat-row offsets of batch and kv head, k and v
    as ``(B·G·S, ·)`` and the query block size."""
    xp = p.xp
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
    if block_q is None:
        per_query = max(1, batch_size * p.heads * count * (p.dim + p.value_dim))
        block_q = max(1, GATHER_BLOCK_ELEMENTS // per_query)
    return idx, count, batch_offset, head_offset, k_flat, v_flat, block_q


def gather_backward(p: Prepared, indices: Any, out: Any, lse: Any, d_out: Any, d_lse: Any = None, *, scale: float,
                    mask: Any = None, bias: Any = None, softcap: float | None = None,
                    block_q: int | None = None, dropout: Dropout | None = None) -> Gradients:
    """The VJP of :func:`gather` at its result ``(out, lse)``: per query ``i`` and listed key ``j = idx[i, t]``,

    .. math::

        P_{it} = e^{z_{it} - \\mathrm{lse}_i},\\quad dz_{it} = P_{it}\\,(dO_i\\cdot v_j - D_i),\\quad
        dq_i = \\tau \\textstyle\\sum_t ds_{it} k_j,\\quad dk_j \\mathrel{+}= \\tau\\, ds_{it} q_i,\\quad
        dv_j \\mathrel{+}= P_{it}\\, dO_i

    with ``D_i = rowsum(dO∘O) − dL_i`` and ``ds = dz∘cap'`` (FA2, Dao 2023, §3.1.2); with dropout
    ``dO_i·v_j`` becomes ``M̃_it dO_i·v_j`` and ``dv_j`` gets ``P_it M̃_it dO_i``. A key listed
    several times, by one row or by many, or read by several query heads of a GQA group,
    accumulates every contribution: the scatter-add is deterministic
    (:func:`reflex.backends.scatter.scatter_add`: a stable sort, sums in a fixed order). The
    indices are constants. Memory: the contributions of all query blocks, O(L·K·(D + E)).
    """
    if p.length == 0 or p.key_length == 0:
        return zero_gradients(p, bias)
    options = dict(scale=scale, mask=mask, bias=bias, softcap=softcap, block_q=block_q, dropout=dropout)
    return guarded_backward(p, out, lse, d_out, d_lse, lambda c: _gather(c, indices, **options),
                            lambda c, o, l_, do, dl: _gather_backward(c, indices, o, l_, do, dl, **options))


def _gather_backward(p: Prepared, indices: Any, out: Any, lse: Any, d_out: Any, d_lse: Any, *, scale: float, mask: Any,
                     bias: Any, softcap: float | None, block_q: int | None,
                     dropout: Dropout | None = None) -> Gradients:
    from reflex.backends.scatter import scatter_add

    xp = p.xp
    masks, biases = _as_tuple(mask), _as_tuple(bias)
    idx, count, batch_offset, head_offset, k_flat, v_flat, block_q = _layout(p, indices, masks, biases, block_q)
    d_out = xp.astype(d_out, p.q.dtype)
    delta = xp.sum(d_out * xp.astype(out, p.q.dtype), axis=-1, keepdims=True)
    if d_lse is not None:
        delta = delta - xp.astype(d_lse, p.q.dtype)[..., None]
    lse_all = lse[..., None]

    def query_block(i0: int) -> tuple[Any, Any, Any, Any, list[TermGradient]]:
        i1 = min(i0 + block_q, p.length)
        terms = [TermGradient(p, t) for t in biases]
        cols = idx[..., i0:i1, :]
        valid = cols >= 0
        flat = xp.reshape(xp.where(valid, cols, 0) + batch_offset + head_offset, (-1,))
        block_shape = (*p.batch, p.heads, i1 - i0, count)
        keys = xp.reshape(xp.take(k_flat, flat, axis=0), (*block_shape, p.dim))
        values = xp.reshape(xp.take(v_flat, flat, axis=0), (*block_shape, p.value_dim))
        rows = xp.reshape(xp.arange(i0, i1, dtype=xp.int64, device=p.device), (i1 - i0, 1))
        q = p.q[..., i0:i1, :]
        d_o = d_out[..., i0:i1, :]
        term_values = [_in_compute_dtype(p, g.term(rows, cols)) for g in terms]
        s, slope = capped_scores(p, xp.vecdot(xp.expand_dims(q * scale, axis=-2), keys, axis=-1), softcap,
                                 term_values, [valid] + [t(rows, cols) for t in masks])
        P = probabilities(xp, s, lse_all[..., i0:i1, :])
        dp = xp.vecdot(xp.expand_dims(d_o, axis=-2), values, axis=-1)
        kept = P
        factor = gathered_dropout_factor(p, dropout, rows, cols)
        if factor is not None:
            dp = dp * factor
            kept = P * factor
        dz = P * (dp - delta[..., i0:i1, :])
        for g, value in zip(terms, term_values):
            if g.differentiable:
                g.add_callable(xp, dz, rows, cols, tuple(value.shape))
        ds = dz if slope is None else dz * slope
        dq = scale * (xp.expand_dims(ds, axis=-2) @ keys)[..., 0, :]
        dk = xp.reshape(scale * ds[..., None] * xp.expand_dims(q, axis=-2), (-1, p.dim))
        dv = xp.reshape(kept[..., None] * xp.expand_dims(d_o, axis=-2), (-1, p.value_dim))
        return dq, flat, dk, dv, terms

    blocks = parallel_map(query_block, range(0, p.length, block_q), like=p.q)
    rows_total = int(k_flat.shape[0])
    key_shape = (*p.batch, p.kv_heads, p.key_length)
    if count == 0:
        dk = xp.zeros((*key_shape, p.dim), dtype=p.q.dtype, device=p.device)
        dv = xp.zeros((*key_shape, p.value_dim), dtype=p.q.dtype, device=p.device)
    else:
        flat = xp.concat([b[1] for b in blocks], axis=0)
        dk = xp.reshape(scatter_add(flat, xp.concat([b[2] for b in blocks], axis=0), rows_total), (*key_shape, p.dim))
        dv = xp.reshape(scatter_add(flat, xp.concat([b[3] for b in blocks], axis=0), rows_total),
                        (*key_shape, p.value_dim))
    dq = xp.concat([b[0] for b in blocks], axis=-2) if len(blocks) != 1 else blocks[0][0]
    terms = blocks[0][4]
    for b in blocks[1:]:
        for g, other in zip(terms, b[4]):
            g.merge(other)
    return Gradients(dq, dk, dv, tuple(g.result() for g in terms))
