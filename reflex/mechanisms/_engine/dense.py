"""Kernel 1, dense: materialises the ``(..., H, L, S)`` scores. The definition of truth for small sizes."""

from __future__ import annotations

from typing import Any

from reflex.mechanisms._engine.terms import (_as_tuple, _evaluate, _grids, _group_queries, _scores, _softmax_parts,
                                             _ungroup, empty_result, finish, guarded)
from reflex.mechanisms._inputs import Prepared

__all__ = ["dense", "scores", "weights"]


def _dense_scores(p: Prepared, *, scale: float, mask: Any, bias: Any, softcap: float | None) -> Any:
    """Grouped final scores ``(..., G, H/G, L, S)`` (softcap, biases, masks → −∞)."""
    xp = p.xp
    rows, cols = _grids(p, 0, p.length, 0, p.key_length)
    masks = _evaluate(p, _as_tuple(mask), rows, cols, None)
    biases = _evaluate(p, _as_tuple(bias), rows, cols, None)
    q = _group_queries(p, p.q * scale)
    return _scores(p, q @ xp.matrix_transpose(xp.expand_dims(p.k, axis=-3)), softcap, biases, masks)


def dense(p: Prepared, *, scale: float, mask: Any = None, bias: Any = None, softcap: float | None = None) -> tuple[Any, Any]:
    """Dense masked softmax attention: ``(out (..., H, L, E), lse (..., H, L))``.

    Non-finite K or V entries reach only the rows that attend them (:func:`~.terms.guarded`)."""
    return guarded(p, lambda c: _dense(c, scale=scale, mask=mask, bias=bias, softcap=softcap))


def _dense(p: Prepared, *, scale: float, mask: Any, bias: Any, softcap: float | None) -> tuple[Any, Any]:
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
