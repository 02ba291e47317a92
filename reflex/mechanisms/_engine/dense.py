"""Kernel 1, dense: materialises the ``(..., H, L, S)`` scores. The definition of truth for small sizes."""

from __future__ import annotations

from typing import Any

from reflex.mechanisms._engine.extra import extend, extend_dropout
from reflex.mechanisms._engine.record import record, record_opaque
from reflex.mechanisms._engine.window import restrict, restrict_dropout
from reflex.mechanisms._engine.terms import (Gradients, TermGradient, _as_tuple, _evaluate, _grids, _group_queries,
                                             _scores, _softmax_parts, _ungroup, block_backward, cotangents,
                                             empty_result, finish, guarded, guarded_backward, probabilities,
                                             zero_gradients)
from reflex.mechanisms._engine.dropout import Dropout, dropout_factor
from reflex.mechanisms._inputs import Prepared

__all__ = ["dense", "dense_backward", "scores", "weights"]


def _dense_scores(p: Prepared, *, scale: float, mask: Any, bias: Any, softcap: float | None) -> Any:
    """Grouped final scores ``(..., G, H/G, L, S)`` (softcap, biases, masks → −∞)."""
    xp = p.xp
    rows, cols = _grids(p, 0, p.length, 0, p.key_length)
    masks = _evaluate(p, _as_tuple(mask), rows, cols, None)
    biases = _evaluate(p, _as_tuple(bias), rows, cols, None)
    q = _group_queries(p, p.q * scale)
    return _scores(p, q @ xp.matrix_transpose(xp.expand_dims(p.k, axis=-3)), softcap, biases, masks)


def dense(p: Prepared, *, scale: float, mask: Any = None, bias: Any = None, softcap: float | None = None,
          dropout: Dropout | None = None) -> tuple[Any, Any]:
    """Dense masked softmax attention: ``(out (..., H, L, E), lse (..., H, L))``.

    ``dropout`` (:class:`~.dropout.Dropout`): ``out = (P∘M̃)·V`` with the undropped lse.
    Non-finite K or V entries reach only the rows that attend them (:func:`~.terms.guarded`); with
    dropout, only the rows that attend and keep them."""
    mask, bias, softcap = extend("dense", p, mask, bias, softcap)  # a caller's terms on any mechanism (extra.py)
    dropout = extend_dropout(p, dropout)  # a caller's dropout_mask/dropout_p on any mechanism (extra.py)
    dropout = restrict_dropout(p, dropout)  # its keep mask in the distributed window, if any (window.py)
    p, mask, bias, _, _ = restrict(p, mask, bias)  # a distributed window, if any (window.py)
    result = guarded(p, lambda c: _dense(c, scale=scale, mask=mask, bias=bias, softcap=softcap, dropout=dropout))
    options = dict(scale=scale, mask=mask, bias=bias, softcap=softcap)
    record("dense", p, options if dropout is None else {**options, "dropout": dropout}, result)
    return result


def _dense(p: Prepared, *, scale: float, mask: Any, bias: Any, softcap: float | None,
           dropout: Dropout | None = None) -> tuple[Any, Any]:
    xp = p.xp
    if p.length == 0 or p.key_length == 0:
        return empty_result(p)
    s = _dense_scores(p, scale=scale, mask=mask, bias=bias, softcap=softcap)
    weights, row_max, row_sum = _softmax_parts(xp, s)
    if dropout is not None:
        rows, cols = _grids(p, 0, p.length, 0, p.key_length)
        weights = weights * dropout_factor(p, dropout, rows, cols, None)
    out, lse = finish(xp, weights @ xp.expand_dims(p.v, axis=-3), row_max, row_sum)
    return _ungroup(p, out), _ungroup(p, lse[..., None])[..., 0]


def scores(p: Prepared, *, scale: float, mask: Any = None, bias: Any = None, softcap: float | None = None) -> Any:
    """The final scores ``(..., H, L, S)`` the dense kernel normalises: ``scale·q·kᵀ`` with no terms.

    For mechanisms that mix, select from or return score maps (talking heads, top-k, RealFormer).
    """
    record_opaque("scores")
    return _ungroup(p, _dense_scores(p, scale=scale, mask=mask, bias=bias, softcap=softcap))


def weights(p: Prepared, *, scale: float, mask: Any = None, bias: Any = None, softcap: float | None = None) -> Any:
    """The dense kernel's softmax probabilities ``(..., H, L, S)``; a fully masked row is all 0.

    For mechanisms that multiply or reuse attention maps (Nyström, clustered, predictive).
    """
    record_opaque("weights")
    xp = p.xp
    if p.length == 0 or p.key_length == 0:
        return xp.zeros(p.score_shape, dtype=p.q.dtype, device=p.device)
    unnormalised, _, row_sum = _softmax_parts(xp, _dense_scores(p, scale=scale, mask=mask, bias=bias, softcap=softcap))
    return _ungroup(p, unnormalised / xp.where(row_sum == 0, 1.0, row_sum))


def dense_backward(p: Prepared, out: Any, lse: Any, d_out: Any, d_lse: Any = None, *, scale: float, mask: Any = None,
                   bias: Any = None, softcap: float | None = None, dropout: Dropout | None = None) -> Gradients:
    """The VJP of :func:`dense` at its result ``(out, lse)``: gradients of ``⟨d_out, out⟩ + ⟨d_lse, lse⟩``.

    .. math::

        P = e^{Z - \\mathrm{lse}},\\quad D_i = \\textstyle\\sum_e dO_{ie} O_{ie} - dL_i,\\quad
        dZ = P \\circ (dO\\,V^\\top - D),\\quad dS = dZ \\circ \\mathrm{cap}'(S),

        dQ = \\tau\\, dS\\, K,\\quad dK = \\tau\\, dS^\\top Q,\\quad dV = P^\\top dO,\\quad
        d\\mathrm{bias} = dZ \\text{ summed over its broadcast axes}

    (FA2, Dao 2023, §3.1.2 and Alg. 2; lse cotangent: ∂lse_i/∂Z_ij = P_ij). GQA: dK, dV of kv head g
    sum the H/G query heads that read it. Dropout (keep mask M, ``M̃ = M/(1 − p)``, out = (P∘M̃)V):
    ``dV = (P∘M̃)ᵀdO`` and ``dP = (dO·Vᵀ)∘M̃`` in place of ``dO·Vᵀ``; D = rowsum(dO∘O) still holds
    (FA2's dropout backward). A fully masked row (lse −∞) has P = 0: zero gradients,
    never NaN. ``d_out (..., H, L, E)``, ``d_lse (..., H, L)`` or None. Returns :class:`Gradients`
    (``bias``: one entry per bias term, see :class:`~.terms.TermGradient`).
    """
    if p.length == 0 or p.key_length == 0:
        return zero_gradients(p, bias)
    return guarded_backward(
        p, out, lse, d_out, d_lse,
        lambda c: _dense(c, scale=scale, mask=mask, bias=bias, softcap=softcap, dropout=dropout),
        lambda c, o, l_, do, dl: _dense_backward(c, o, l_, do, dl, scale=scale, mask=mask, bias=bias, softcap=softcap,
                                                 dropout=dropout))


def _dense_backward(p: Prepared, out: Any, lse: Any, d_out: Any, d_lse: Any, *, scale: float, mask: Any, bias: Any,
                    softcap: float | None, dropout: Dropout | None = None) -> Gradients:
    xp = p.xp
    rows, cols = _grids(p, 0, p.length, 0, p.key_length)
    masks = _evaluate(p, _as_tuple(mask), rows, cols, None)
    terms = [TermGradient(p, t) for t in _as_tuple(bias)]
    q = _group_queries(p, p.q)
    k = xp.expand_dims(p.k, axis=-3)
    v = xp.expand_dims(p.v, axis=-3)
    d_o, delta = cotangents(p, out, d_out, d_lse)
    ds, kept = block_backward(p, terms, rows, cols, None, q, k, v, scale=scale, softcap=softcap, masks=masks,
                              lse=_group_queries(p, lse[..., None]), d_o=d_o, delta=delta, dropout=dropout)
    return Gradients(_ungroup(p, scale * (ds @ k)), scale * _group_sum_product(p, ds, q),
                     _group_sum_product(p, kept, d_o),
                     tuple(g.result() for g in terms))


def _group_sum_product(p: Prepared, a: Any, b: Any) -> Any:
    """``Σ_{h in group} Σ_i a[..., g, h, i, j] b[..., g, h, i, :]`` → ``(..., G, s, F)``: one product per kv head,
    the group's query heads and rows stacked (the GQA sum of dK, dV)."""
    xp = p.xp
    lead = a.shape[:-4]
    a2 = xp.reshape(a, (*lead, p.kv_heads, p.group * a.shape[-2], a.shape[-1]))
    b2 = xp.reshape(b, (*lead, p.kv_heads, p.group * b.shape[-2], b.shape[-1]))
    return xp.matrix_transpose(a2) @ b2
