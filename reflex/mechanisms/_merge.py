"""Merging partial softmax results by their logsumexp, and attention sinks as one such partial.

Partials k over disjoint key sets give ``(O_k, L_k)``; with ``m = max_k L_k``:

.. math::

    L = m + \\log \\sum_k e^{L_k - m}, \\qquad O = \\sum_k e^{L_k - L}\\, O_k,

and ``O = 0, L = −∞`` when every partial is empty (``L_k = −∞``). Empty partials are skipped, never
multiplied by 0 (their outputs may be anything, and 0·NaN = NaN); an lse of +∞ (FlashAttention-2's
and FlashMLA's "no key") is read as −∞. Partials are merged in the order given, so the result is
deterministic. Sources: Milakov & Gimelshein 2018 (online softmax); FlashAttention-2 (Dao 2023) §3.1
(split-KV); ring attention (Liu et al. 2023).

An attention sink (gpt-oss; StreamingLLM's learned variant) is a per-head logit ``s_h`` that joins
each row's softmax denominator and carries no value: exactly a partial with ``L = s_h``, ``O = 0``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["merge_partials", "add_sinks", "sinks_vjp"]


def merge_partials(xp: Any, outs: Sequence[Any], lses: Sequence[Any]) -> tuple[Any, Any]:
    """``(O, L)`` of partials ``O_k (..., L, E)``, ``L_k (..., L)`` over disjoint key sets."""
    lses = [xp.where(lse == math.inf, -math.inf, lse) for lse in lses]
    top = lses[0]
    for lse in lses[1:]:
        top = xp.maximum(top, lse)
    shift = xp.where(top == -math.inf, 0.0, top)
    total = xp.zeros_like(shift)
    for lse in lses:
        total = total + xp.exp(lse - shift)
    empty = total == 0
    lse_all = xp.where(empty, -math.inf, shift + xp.log(xp.where(empty, 1.0, total)))
    out = xp.zeros_like(outs[0])
    for o, lse in zip(outs, lses):
        present = lse != -math.inf
        weight = xp.where(present, xp.exp(lse - xp.where(empty, 0.0, lse_all)), 0.0)
        out = out + xp.where(present[..., None], weight[..., None] * o, 0.0)
    return out, lse_all


def _sink_column(xp: Any, sinks: Any) -> Any:
    """``sinks (H,)`` as ``(H, 1)``, to broadcast against an lse ``(..., H, L)``."""
    return xp.reshape(sinks, (int(sinks.shape[0]), 1))


def add_sinks(xp: Any, out: Any, lse: Any, sinks: Any) -> tuple[Any, Any]:
    """Merge per-head sink logits ``sinks (H,)`` into ``out (..., H, L, E)`` and ``lse (..., H, L)``.

    ``O' = O·e^{L − L'}``, ``L' = log(e^L + e^{s_h})`` (the lse includes the sink, as FlashAttention-4's
    reference); a row with no visible key keeps ``O' = 0`` and gets ``L' = s_h``.
    """
    column = _sink_column(xp, sinks)
    sink_lse = xp.broadcast_to(column, lse.shape)
    return merge_partials(xp, [out, xp.zeros_like(out)], [lse, sink_lse])


def sinks_vjp(xp: Any, out: Any, lse: Any, sinks: Any, d_out: Any, d_lse: Any | None) -> tuple[Any, Any, Any]:
    """Cotangents ``(d_out_inner, d_lse_inner, d_sinks)`` through :func:`add_sinks`.

    With ``w = e^{L − L'}`` (the non-sink share of each row) and ``O' = w·O``, ``L' = log(e^L + e^s)``:
    ``dO = w·dO'``, ``dL = w·(dL' + ⟨dO', O⟩·(1 − w))``, ``ds = (1 − w)·(dL' − ⟨dO', O'⟩)`` summed over the
    batch axes and queries. (``⟨dO', O'⟩ = w⟨dO', O⟩``.) A row with no visible key has w = 0: its dL'
    goes entirely to the sink.
    """
    column = _sink_column(xp, sinks)
    merged_out, merged_lse = add_sinks(xp, out, lse, sinks)
    present = lse != -math.inf
    w = xp.where(present, xp.exp(lse - merged_lse), 0.0)
    d_lse_prime = xp.zeros_like(lse) if d_lse is None else d_lse
    dot = xp.sum(d_out * out, axis=-1)
    d_out_inner = w[..., None] * d_out
    d_lse_inner = xp.where(present, w * (d_lse_prime + dot * (1.0 - w)), 0.0)
    per_row = (1.0 - w) * (d_lse_prime - w * dot)
    heads = int(column.shape[0])
    per_row = xp.reshape(per_row, (-1, heads, int(per_row.shape[-1]))) if per_row.ndim >= 2 else per_row
    d_sinks = xp.sum(xp.sum(per_row, axis=-1), axis=0)
    return d_out_inner, d_lse_inner, d_sinks
