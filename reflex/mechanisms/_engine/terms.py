"""The engine's shared pieces: grouped GQA views, term evaluation, the score block and the softmax statistics.

Conventions are in :mod:`reflex.mechanisms._engine` (the package docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from reflex.mechanisms._inputs import Prepared
from reflex.mechanisms._numerics import unbroadcast

Term = Any  # an array broadcastable to (..., H, L, S), or a callable (rows, cols) -> such an array
TileActive = Callable[[int, int, int, int], bool]


def _group_queries(p: Prepared, x: Any) -> Any:
    """``(..., H, l, ·)`` → ``(..., G, H/G, l, ·)``."""
    return p.xp.reshape(x, (*x.shape[:-3], p.kv_heads, p.group, *x.shape[-2:]))


def _ungroup(p: Prepared, x: Any) -> Any:
    """``(..., G, H/G, l, ·)`` → ``(..., H, l, ·)``."""
    return p.xp.reshape(x, (*x.shape[:-4], p.heads, *x.shape[-2:]))


def _group_term(p: Prepared, t: Any) -> Any:
    """A term value broadcastable to ``(..., H, l, s)`` → broadcastable to ``(..., G, H/G, l, s)``."""
    if isinstance(t, BoundTransform):
        return t
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
    if isinstance(value, BoundTransform):
        return value
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


class ScoreTransform:
    """A term kind that rewrites the scores of a tile (FlexAttention's ``score_mod``), in the bias slot.

    ``function(s, rows, cols) -> s'``: ``s`` the raw scaled scores ``scale·q·kᵀ`` of a tile,
    ungrouped ``(..., H, l, s)``, and the index grids ``rows (l, 1)``, ``cols (1, s)``; the value is
    broadcast to ``s``'s shape and cast to the compute dtype. Applied first — before softcap, biases
    and masks — on the dense and tiled kernels (not gather). Backward: ``slope(s, rows, cols)`` is
    the elementwise derivative ``∂s'/∂s`` (``None``: the backward raises); optional ``params``
    (name → array) and ``vjp(s, rows, cols, d_value) -> {name: gradient}`` give the gradients of
    ``⟨d_value, s'⟩`` for parameters the transform reads (``d_value``: the cotangent of ``s'`` on
    the tile, 0 where masked), summed over tiles like a differentiable callable term's.
    """

    def __init__(self, function: Callable[..., Any], *, slope: Callable[..., Any] | None = None,
                 params: dict[str, Any] | None = None, vjp: Callable[..., Any] | None = None) -> None:
        self.function, self.slope, self.params, self.vjp = function, slope, dict(params or {}), vjp

    def __call__(self, rows: Any, cols: Any) -> "BoundTransform":
        return BoundTransform(self, rows, cols)


class BoundTransform:
    """A :class:`ScoreTransform` on one tile's index grids (what :func:`_evaluate` returns for it)."""

    def __init__(self, term: ScoreTransform, rows: Any, cols: Any) -> None:
        self.term, self.rows, self.cols = term, rows, cols
        self.input: Any = None
        self.out_slope: Any = None  # the softcap slope after the transform (ungrouped), set by capped_scores

    def _fresh(self, p: Prepared, value: Any, like: Any) -> Any:
        """``value`` broadcast to ``like``'s shape, in the compute dtype, as a new array (updated in place later)."""
        xp = p.xp
        if value is like:
            return value
        if not hasattr(value, "shape"):
            value = xp.asarray(value, dtype=like.dtype, device=p.device)
        value = xp.broadcast_to(xp.astype(value, like.dtype), tuple(like.shape))
        return xp.asarray(value, copy=True)

    def apply(self, p: Prepared, s: Any) -> Any:
        s = _ungroup(p, s)
        return _group_queries(p, self._fresh(p, self.term.function(s, self.rows, self.cols), s))

    def apply_with_slope(self, p: Prepared, s: Any) -> tuple[Any, Any]:
        """The transformed scores and ``∂s'/∂s`` (grouped); keeps the input for :meth:`param_vjp`."""
        if self.term.slope is None:
            raise NotImplementedError("a score transform without a derivative (slope) has no backward")
        s = _ungroup(p, s)
        self.input = s
        value = self._fresh(p, self.term.function(s, self.rows, self.cols), s)
        slope = self._fresh(p, self.term.slope(s, self.rows, self.cols), s)
        return _group_queries(p, value), _group_queries(p, slope)

    def param_vjp(self, dz: Any) -> dict[str, Any]:
        """The parameter gradients of this tile from ``dz`` (ungrouped score cotangent ``(..., H, l, s)``)."""
        if self.term.vjp is None:
            return {}
        d_value = dz if self.out_slope is None else dz * self.out_slope
        return self.term.vjp(self.input, self.rows, self.cols, d_value)


def term_shape(value: Any) -> Any:
    """What the backward kernels keep of a callable term's tile value for :meth:`TermGradient.add_callable`:
    its shape, or the bound tile itself for a :class:`ScoreTransform`."""
    return value if isinstance(value, BoundTransform) else tuple(value.shape)


def _scores(p: Prepared, raw: Any, softcap: float | None, biases: list[Any], masks: list[Any]) -> Any:
    """Final scores from raw ``scale·q·k``: score transforms, softcap, then biases, then masks (→ −∞)."""
    xp = p.xp
    s = raw  # a fresh temporary: updated in place below (saves a pass of page faults per tile)
    for b in biases:
        if isinstance(b, BoundTransform):
            s = b.apply(p, s)
    if softcap is not None:
        s = softcap * xp.tanh(s / softcap)
    for b in biases:
        if not isinstance(b, BoundTransform):
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


def _softmax_parts(xp: Any, s: Any) -> tuple[Any, Any, Any]:
    """Unnormalised weights ``exp(s − m)``, the row max ``m`` and the row sum ``ℓ`` of scores ``s``."""
    row_max = xp.max(s, axis=-1, keepdims=True)
    s -= _safe_max(xp, row_max)
    weights = xp.exp(s)
    return weights, row_max, xp.sum(weights, axis=-1, keepdims=True)


# --- non-finite keys and values: inert where not attended ----------------------------------------

def kv_finite(p: Prepared) -> bool:
    """Whether every entry of ``p.k`` and ``p.v`` is finite: the one test per call that keeps the fast path."""
    xp = p.xp
    return bool(xp.all(xp.isfinite(p.k))) and bool(xp.all(xp.isfinite(p.v)))


def _zero_nonfinite(xp: Any, x: Any) -> Any:
    return xp.where(xp.isfinite(x), x, 0.0)


def _indicator(xp: Any, flags: Any, dtype: Any) -> Any:
    return xp.astype(flags, dtype)


def guarded(p: Prepared, run: Callable[[Prepared], tuple[Any, Any]]) -> tuple[Any, Any]:
    """``run(p)`` with NaN/±inf in K or V inert for the rows that do not attend them.

    Fast path: K and V finite, ``run(p)`` as is. Careful path: non-finite entries are zeroed and
    ``run`` gets value rows extended with indicator columns ``[V₀ | isnan V | V = +∞ | V = −∞ |
    key k_j non-finite]``; since weights are ≥ 0, an indicator column of the output is > 0 exactly
    where the row gives a marked key a nonzero weight. Those rows then get the garbage they
    attended: NaN where an attended value entry is NaN (or both +∞ and −∞), ±∞ where it is ±∞,
    and NaN in every column and in the lse where an attended *key* is non-finite. Every other
    row — masked, outside its window, beyond causal, padding — is computed as if the non-finite
    entries were not there (0·NaN never reaches it). One careful-path run costs a 4E + 1 wide
    value product instead of E.
    """
    if kv_finite(p):
        return run(p)
    out, lse = run(clean_prepared(p))
    return poison(p, out, lse)


def clean_prepared(p: Prepared) -> Prepared:
    """``p`` with non-finite K, V entries zeroed and V extended by the indicator columns of :func:`guarded`."""
    xp = p.xp
    dtype = p.v.dtype
    key_bad = xp.logical_not(xp.all(xp.isfinite(p.k), axis=-1))[..., None]
    columns = [_zero_nonfinite(xp, p.v), _indicator(xp, xp.isnan(p.v), dtype),
               _indicator(xp, p.v == math.inf, dtype), _indicator(xp, p.v == -math.inf, dtype),
               _indicator(xp, key_bad, dtype)]
    return replace(p, k=_zero_nonfinite(xp, p.k), v=xp.concat(columns, axis=-1), value_dim=4 * p.value_dim + 1)


def poison(p: Prepared, out: Any, lse: Any) -> tuple[Any, Any]:
    """``(out, lse)`` of the original value width from a run on :func:`clean_prepared` inputs."""
    xp = p.xp
    e = p.value_dim
    nan_hit, pos, neg = out[..., e:2 * e] > 0, out[..., 2 * e:3 * e] > 0, out[..., 3 * e:4 * e] > 0
    key_hit = out[..., 4 * e:] > 0
    o = out[..., :e]
    o = xp.where(pos, math.inf, o)
    o = xp.where(neg, -math.inf, o)
    o = xp.where(nan_hit | (pos & neg) | key_hit, math.nan, o)
    return o, xp.where(key_hit[..., 0], math.nan, lse)


# --- backward: shared pieces ---------------------------------------------------------------------

def capped_scores(p: Prepared, raw: Any, softcap: float | None, biases: list[Any],
                  masks: list[Any]) -> tuple[Any, Any]:
    """Final scores from raw ``scale·q·k`` as :func:`_scores` computes them, and the slope ``∂s/∂raw``
    before biases and masks: softcap's ``1 − tanh²(·/c)`` times each score transform's derivative
    (``None`` with neither; 0 wherever the final score is −∞ when a transform is present)."""
    xp = p.xp
    slope = None
    s = raw
    transforms = [b for b in biases if isinstance(b, BoundTransform)]
    for b in transforms:
        s, d = b.apply_with_slope(p, s)
        slope = d if slope is None else slope * d
    cap_slope = None
    if softcap is not None:
        t = xp.tanh(s / softcap)
        s = softcap * t
        cap_slope = 1.0 - t * t
        slope = cap_slope if slope is None else slope * cap_slope
    for b in transforms:
        b.out_slope = None if cap_slope is None else _ungroup(p, cap_slope)
    for b in biases:
        if not isinstance(b, BoundTransform):
            s = s + b
    for m in masks:
        s = xp.where(m, s, -math.inf)
    if transforms:  # a transform's derivative may be non-finite where nothing is attended (dZ = 0 there)
        slope = xp.where(s == -math.inf, 0.0, slope)
    return s, slope


def probabilities(xp: Any, s: Any, lse: Any) -> Any:
    """``P = exp(s − lse)`` with ``lse`` broadcast along keys; 0 on a row whose lse is −∞ (nothing attended)."""
    return xp.exp(s - xp.where(lse == -math.inf, 0.0, lse))


def is_array_term(t: Any) -> bool:
    return hasattr(t, "shape") or not callable(t)


class TermGradient:
    """The gradient of one bias term, accumulated over tiles.

    - An array bias: ``d_bias`` = dZ summed over every axis the bias was broadcast along (masked
      entries carry dZ = 0), shaped like the array.
    - A *differentiable callable term* (see the package docstring): its ``vjp(rows, cols, d_value)``
      on each tile, ``d_value`` = dZ reduced to the shape of ``term(rows, cols)``; the parameter
      gradients it returns are summed over tiles.
    - Any other callable: no gradient (``result()`` is ``None``).
    """

    def __init__(self, p: Prepared, term: Any) -> None:
        self.term = term
        self.xp = p.xp
        self.array = is_array_term(term)
        self.differentiable = self.array or callable(getattr(term, "vjp", None))
        self.grouped = _group_term(p, term) if self.array else None
        self.acc: Any = p.xp.zeros(self.grouped.shape, dtype=p.q.dtype, device=p.device) if self.array else None
        self.params: dict[str, Any] = {}

    def add_array(self, xp: Any, dz: Any, tile: tuple[int, int, int, int] | None) -> None:
        """Add the grouped ``dz`` of a tile (``None`` = the whole score matrix) to an array bias."""
        if tile is None:
            self.acc = self.acc + unbroadcast(xp, dz, tuple(self.acc.shape))
            return
        i0, i1, j0, j1 = tile
        rows = slice(i0, i1) if self.acc.shape[-2] != 1 else slice(None)
        cols = slice(j0, j1) if self.acc.shape[-1] != 1 else slice(None)
        part = self.acc[..., rows, cols]
        self.acc[..., rows, cols] = part + unbroadcast(xp, dz, tuple(part.shape))

    def add_callable(self, xp: Any, dz: Any, rows: Any, cols: Any, value_shape: tuple[int, ...]) -> None:
        """Add ``term.vjp(rows, cols, d_value)``; ``dz`` is broadcast-compatible with the value, which
        has ``value_shape`` (right-aligned)."""
        if isinstance(value_shape, BoundTransform):  # a score transform: its tile's value carries the shape
            for name, g in value_shape.param_vjp(dz).items():
                self.params[name] = g if name not in self.params else self.params[name] + g
            return
        d_value = unbroadcast(xp, dz, tuple(value_shape))
        for name, g in self.term.vjp(rows, cols, d_value).items():
            self.params[name] = g if name not in self.params else self.params[name] + g

    def merge(self, other: "TermGradient") -> None:
        """Add another accumulator of the same term (a parallel part), in a fixed order."""
        if self.array and other.acc is not self.acc:
            self.acc = self.acc + other.acc
        for name, g in other.params.items():
            self.params[name] = g if name not in self.params else self.params[name] + g

    def result(self) -> Any:
        """``d_bias`` shaped like the array; the summed parameter gradients of a differentiable callable; else None."""
        if self.array:
            return self.xp.reshape(self.acc, tuple(self.term.shape))
        if not self.differentiable:
            return None
        # parameters no tile reached (L = 0, S = 0, every tile skipped) get zeros, not a missing entry
        unreached = {name: self.xp.zeros_like(value) for name, value in getattr(self.term, "params", {}).items()
                     if name not in self.params}
        return {**unreached, **self.params}


@dataclass(frozen=True)
class Gradients:
    """A kernel's backward result: ``dq (..., H, L, D)``, ``dk (..., G, S, D)``, ``dv (..., G, S, E)``
    and ``bias``, one entry per bias term in the order given (see :class:`TermGradient`)."""

    dq: Any
    dk: Any
    dv: Any
    bias: tuple[Any, ...]


def block_backward(p: Prepared, terms: list["TermGradient"], rows: Any, cols: Any,
                   tile: tuple[int, int, int, int] | None, q: Any, k: Any, v: Any, *, scale: float,
                   softcap: float | None, masks: list[Any], lse: Any, d_o: Any, delta: Any,
                   dropout: "Dropout | None") -> tuple[Any, Any]:
    """One score block's backward (FlashAttention-2 Alg. 2, inner step), shared by dense and tiled.

    Recomputes ``P = exp(Z − lse)`` on the block (grouped ``q (…, G, H/G, l, D)`` against ``k``,
    ``v (…, G, 1, s, ·)``), forms ``dP = dO·Vᵀ`` (times ``M̃`` under dropout) and
    ``dZ = P∘(dP − D)``, adds each bias term's gradient (``tile`` None = the whole matrix) and returns
    ``(dS, kept)``: ``dS = dZ`` through the softcap slope, ``kept = P`` (``P∘M̃`` under dropout), from
    which the caller forms ``dQ = scale·dS·K``, ``dK = scale·dSᵀ·Q`` and ``dV = keptᵀ·dO``.
    """
    from reflex.mechanisms._engine.dropout import dropout_factor

    xp = p.xp
    values, shapes = [], []
    for g in terms:
        if g.array:
            values.append(g.grouped if tile is None else _slice_tile(g.grouped, *tile))
            shapes.append(None)
        else:
            raw_value = _in_compute_dtype(p, g.term(rows, cols))
            values.append(_group_term(p, raw_value))
            shapes.append(term_shape(raw_value))
    s, slope = capped_scores(p, (q * scale) @ xp.matrix_transpose(k), softcap, values, masks)
    P = probabilities(xp, s, lse)
    dp = d_o @ xp.matrix_transpose(v)
    kept = P
    factor = dropout_factor(p, dropout, rows, cols, tile)
    if factor is not None:
        dp = dp * factor
        kept = P * factor
    dz = P * (dp - delta)
    for g, shape in zip(terms, shapes):
        if g.array:
            g.add_array(xp, dz, tile)
        elif g.differentiable:
            g.add_callable(xp, _ungroup(p, dz), rows, cols, shape)  # the term's value is ungrouped (..., H, l, s)
    return (dz if slope is None else dz * slope), kept


def zero_gradients(p: Prepared, bias: Any) -> Gradients:
    """Gradients of a call with L = 0 or S = 0 (nothing attended: all zero)."""
    xp = p.xp
    z = [xp.zeros(x.shape, dtype=p.q.dtype, device=p.device) for x in (p.q, p.k, p.v)]
    return Gradients(*z, tuple(TermGradient(p, t).result() for t in _as_tuple(bias)))


def cotangents(p: Prepared, out: Any, d_out: Any, d_lse: Any) -> tuple[Any, Any]:
    """Grouped ``dO (..., G, H/G, L, E)`` and ``D − dL (..., G, H/G, L, 1)`` with ``D = rowsum(dO∘O)``
    (FA2 §3.1.2); rows whose output is 0 (nothing attended) have D = 0."""
    xp = p.xp
    d_out = xp.astype(d_out, p.q.dtype)
    delta = xp.sum(d_out * xp.astype(out, p.q.dtype), axis=-1, keepdims=True)
    if d_lse is not None:
        delta = delta - xp.astype(d_lse, p.q.dtype)[..., None]
    return _group_queries(p, d_out), _group_queries(p, delta)


def guarded_backward(p: Prepared, out: Any, lse: Any, d_out: Any, d_lse: Any,
                     forward: Callable[[Prepared], tuple[Any, Any]],
                     backward: Callable[[Prepared, Any, Any, Any, Any], Gradients]) -> Gradients:
    """``backward`` with NaN/±inf in K or V inert for the rows that do not attend them (as :func:`guarded`).

    Careful path: the *hit* rows are those whose forward ``out`` or ``lse`` is not finite (they gave a
    non-finite key or value a nonzero weight). The backward runs on zeroed non-finite entries with
    those rows' cotangents set to 0, then ``dq`` of hit rows and ``dk``, ``dv`` of every key a hit row
    weighs are NaN — the value rows get one extra zero column whose ``dv`` column is ``Σ_i P_ij·hit_i``.
    Every other gradient is exact. Bias gradients are those of the zeroed inputs with the hit rows'
    cotangents dropped.
    """
    if kv_finite(p):
        return backward(p, out, lse, d_out, d_lse)
    xp = p.xp
    dtype = p.q.dtype
    clean = replace(p, k=_zero_nonfinite(xp, p.k), v=_zero_nonfinite(xp, p.v))
    out_c, lse_c = forward(clean)
    hit = xp.any(xp.logical_not(xp.isfinite(out)), axis=-1) | xp.isnan(lse)
    keep = xp.logical_not(hit)
    d_out = xp.where(keep[..., None], xp.astype(d_out, dtype), 0.0)
    if d_lse is not None:
        d_lse = xp.where(keep, xp.astype(d_lse, dtype), 0.0)
    zero_column = xp.zeros((*p.v.shape[:-1], 1), dtype=dtype, device=p.device)
    extended = replace(clean, v=xp.concat([clean.v, zero_column], axis=-1), value_dim=p.value_dim + 1)
    out_e = xp.concat([out_c, xp.zeros((*out_c.shape[:-1], 1), dtype=dtype, device=p.device)], axis=-1)
    d_out_e = xp.concat([d_out, xp.astype(hit, dtype)[..., None]], axis=-1)
    g = backward(extended, out_e, lse_c, d_out_e, d_lse)
    weighed = g.dv[..., p.value_dim:] > 0
    return Gradients(xp.where(hit[..., None], math.nan, g.dq), xp.where(weighed, math.nan, g.dk),
                     xp.where(weighed, math.nan, g.dv[..., :p.value_dim]), g.bias)
