"""Dropout with an explicit keep mask on the engine's P·V product (no hidden randomness).

``O = (P∘M̃)·V`` with ``M̃ = M/(1 − p)``; P, the row statistics and the lse are those without dropout
(flash-attn's reference ``attention_ref``). The kernels (dense, tiled, gather) and their backward read
the keep mask through :func:`dropout_factor` / :func:`gathered_dropout_factor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reflex.mechanisms._engine.terms import _evaluate
from reflex.mechanisms._inputs import Prepared

__all__ = ["Dropout", "check_dropout", "dropout_factor", "gathered_dropout_factor"]


@dataclass(frozen=True)
class Dropout:
    """Dropout with an explicit keep mask (no hidden randomness): ``O = (P∘M̃)·V``, ``M̃ = M/(1 − p)``.

    ``keep``: a boolean term (True = keep) — an array broadcastable to ``(..., H, L, S)`` or a
    callable ``(rows, cols) -> bool`` like any mask term (in the gather kernel an array is read at
    the gathered key positions, a callable receives them as ``cols``). ``rate``: p in [0, 1). The
    probabilities P, the row statistics and the lse are those without dropout (flash-attn's
    reference, ``attention_ref``: dropped entries set to 0, V scaled by 1/(1 − p)).
    """

    keep: Any
    rate: float


def check_dropout(p: Prepared, keep: Any, rate: Any) -> "Dropout | None":
    """The :class:`Dropout` of a mechanism's ``dropout_mask=``/``dropout_p=`` options, or None.

    ``dropout_p = 0`` is no dropout (the mask is not read, as flash-attn); ``dropout_p > 0`` needs a
    ``dropout_mask`` (reflex draws no random numbers: build one with :mod:`reflex.random`).
    """
    from reflex.mechanisms._inputs import check_term

    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1); got {rate!r}")
    if float(rate) == 0.0:
        return None
    if keep is None:
        raise ValueError(f"dropout_p={rate} needs dropout_mask (a boolean keep mask broadcastable to (..., H, L, S), "
                         f"True = keep): reflex draws no random numbers")
    return Dropout(check_term(p, "dropout_mask", keep, boolean=True), float(rate))


def dropout_factor(p: Prepared, dropout: "Dropout | None", rows: Any, cols: Any,
                   tile: tuple[int, int, int, int] | None) -> Any:
    """Grouped ``M̃ = M/(1 − p)`` on a dense/tiled tile (``(..., G, H/G, l, s)``-broadcastable), or None."""
    if dropout is None:
        return None
    keep = _evaluate(p, (dropout.keep,), rows, cols, tile)[0]
    return p.xp.astype(keep, p.q.dtype) * (1.0 / (1.0 - dropout.rate))


def gathered_dropout_factor(p: Prepared, dropout: "Dropout | None", rows: Any, cols: Any) -> Any:
    """``M̃`` at the gathered key positions ``cols (..., H, l, K)`` of the query rows ``rows (l, 1)``, or None."""
    if dropout is None:
        return None
    xp = p.xp
    keep = dropout.keep
    if callable(keep) and not hasattr(keep, "shape"):
        value = keep(rows, cols)
    else:
        i0, i1 = int(rows[0, 0]), int(rows[-1, 0]) + 1
        full = xp.broadcast_to(xp.reshape(keep, (1,) * (len(p.score_shape) - keep.ndim) + tuple(keep.shape)),
                               p.score_shape)[..., i0:i1, :]
        value = xp.take_along_axis(full, xp.where(cols >= 0, cols, 0), axis=-1)
    return xp.astype(value, p.q.dtype) * (1.0 / (1.0 - dropout.rate))
