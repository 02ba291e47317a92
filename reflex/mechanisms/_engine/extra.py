"""The engine's extra terms: a caller's ``mask``, ``bias``, ``softcap`` and padded lengths on any engine mechanism.

Every mechanism that runs on the engine (its pattern is a mask, its prior a bias) accepts the
options of :func:`reflex.full_attention` through one shared declaration: the option layer
(:func:`reflex.mechanisms._options.typed_options`) adds ``mask``, ``bias``, ``softcap``,
``seqlens_q``, ``seqlens_k`` and ``key_leftpad`` to the public signature of every q, k, v mechanism
that can return an lse and lacks them, validates them, and runs the mechanism inside
:func:`extra_terms`. Each engine kernel (:func:`~.dense.dense`, :func:`~.tiled.tiled`,
:func:`~.gather.gather`) then calls :func:`extend` on entry, which appends the caller's terms to the
call's own, so the mechanism's output is

.. math::

    \\mathrm{full\\_attention}(q, k, v,\\ \\mathrm{mask} = \\mathrm{pattern} \\wedge \\mathrm{mask},\\
    \\mathrm{bias} = \\mathrm{prior} + \\mathrm{bias},\\ \\mathrm{softcap} = c)

(softcap on the scaled scores, then the biases, then the masks: the engine's order). The terms are
recorded with the call, so the engine backward — and :func:`reflex.vjp` — returns ``d_bias``.

``dropout_mask``/``dropout_p`` join the same way (:func:`extend_dropout`): the keep mask M, broadcastable
to ``(..., H, L, S)``, multiplies the call's probabilities before the value product,
``O = (P∘M)·V/(1 − p)``, with the undropped lse (:class:`~reflex.mechanisms._engine.dropout.Dropout`).

Padded batches (flash-attn's ``query_padding_mask``/``key_padding_mask`` convention, given as
lengths): with ``q (B, H, L, D)``, ``seqlens_q (B,)`` valid queries ``i < seqlens_q[b]``,
``seqlens_k (B,)`` valid keys, and ``key_leftpad (B,)`` the first valid key (flash-attn's
``cache_leftpad``: keys ``key_leftpad[b] ≤ j < key_leftpad[b] + seqlens_k[b]`` are valid; flash-attn's
``cache_seqlens`` is ``key_leftpad + seqlens_k``). Padded queries attend nothing (output 0, lse −∞)
and padded keys are attended by nothing. A mechanism whose pattern depends on the alignment of
queries and keys (causal, windows, ALiBi distances) takes it from :func:`sequence_offset`: per
sequence, query i sits at key position ``key_leftpad + i`` (top-left) or
``key_leftpad + i + seqlens_k − seqlens_q`` (bottom-right, flash-attn's padded tests), an offset
array ``(B, 1, 1, 1)`` in the index-grid terms. A mechanism that never calls :func:`sequence_offset`
or :func:`supports_padding` refuses padded lengths (``NotImplementedError``): its pattern would not
be per sequence.

Only engine calls over the mechanism's own ``(..., H, L, S)`` grid can take the terms: a mechanism
that attends a compressed, pooled or regrouped key set (compressive memory, Linformer, memory
compressed, ISAB, ...) raises ``NotImplementedError`` naming it, as does one that made no engine
call at all, or several (passes composed one after another, as axial attention over both axes:
no single pattern for the terms to compose with).
"""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from reflex.mechanisms._inputs import Prepared, check_term

__all__ = ["ExtraTerms", "extra_terms", "extend", "sequence_offset", "supports_padding", "active",
           "TERM_OPTIONS", "PADDING_OPTIONS", "DROPOUT_OPTIONS", "extend_dropout"]

TERM_OPTIONS = ("mask", "bias", "softcap")
PADDING_OPTIONS = ("seqlens_q", "seqlens_k", "key_leftpad")
DROPOUT_OPTIONS = ("dropout_mask", "dropout_p")

_ACTIVE: contextvars.ContextVar["ExtraTerms | None"] = contextvars.ContextVar("reflex_extra_terms", default=None)


@dataclass
class ExtraTerms:
    """The caller's terms for one mechanism call over the grid ``batch + (heads, length, key_length)``."""

    function: str
    batch: tuple[int, ...]
    heads: int
    length: int
    key_length: int
    mask: Any = None
    bias: Any = None
    softcap: float | None = None
    seqlens_q: Any = None
    seqlens_k: Any = None
    key_leftpad: Any = None
    dropout_mask: Any = None
    dropout_p: Any = None
    used: int = 0
    aligned: bool = False

    @property
    def padded(self) -> bool:
        return self.seqlens_q is not None or self.seqlens_k is not None or self.key_leftpad is not None

    @property
    def grid(self) -> tuple[int, ...]:
        return (*self.batch, self.heads, self.length, self.key_length)


def active() -> ExtraTerms | None:
    """The terms of the mechanism call in progress, or None."""
    return _ACTIVE.get()


@contextmanager
def extra_terms(terms: ExtraTerms) -> Iterator[ExtraTerms]:
    """Run a mechanism with ``terms`` appended to its engine calls over its grid.

    On leaving, a call that took no engine call over the grid (and had work to do) raises
    ``NotImplementedError``: the options would otherwise be silently ignored.
    """
    _check_lengths(terms)
    token = _ACTIVE.set(terms)
    try:
        yield terms
    finally:
        _ACTIVE.reset(token)
    if terms.used == 0 and terms.length > 0 and terms.key_length > 0:
        raise NotImplementedError(f"{terms.function}: {_given(terms)} need the mechanism to run on the engine over its "
                                  f"own (L, S) = ({terms.length}, {terms.key_length}) grid; this call made no such "
                                  f"engine call")


def _given(terms: ExtraTerms) -> str:
    names = [n for n in (*TERM_OPTIONS, *PADDING_OPTIONS, *DROPOUT_OPTIONS) if getattr(terms, n) is not None]
    return "=, ".join(names) + "="


def _check_lengths(terms: ExtraTerms) -> None:
    """``seqlens_q``, ``seqlens_k``, ``key_leftpad``: integer ``(B,)`` with one batch axis, in range."""
    if not terms.padded:
        return
    if len(terms.batch) != 1:
        raise ValueError(f"{terms.function}: seqlens_q/seqlens_k/key_leftpad need q of shape (B, H, L, D) with one "
                         f"batch axis; got batch axes {terms.batch}")
    from reflex.backends import namespace

    b = terms.batch[0]
    limits = {"seqlens_q": terms.length, "seqlens_k": terms.key_length, "key_leftpad": terms.key_length}
    for name, limit in limits.items():
        x = getattr(terms, name)
        if x is None:
            continue
        if tuple(x.shape) != (b,):
            raise ValueError(f"{name} must have shape (B,) = ({b},); got {tuple(x.shape)}")
        xp = namespace(x)
        low, high = (int(xp.min(x)), int(xp.max(x))) if b else (0, 0)
        if low < 0 or high > limit:
            raise ValueError(f"{name} must lie in [0, {limit}]; got values from {low} to {high}")
    if b and terms.key_leftpad is not None:
        xp = namespace(terms.key_leftpad)
        leftpad = xp.astype(terms.key_leftpad, xp.int64)
        count = xp.astype(terms.seqlens_k, xp.int64) if terms.seqlens_k is not None else terms.key_length - leftpad
        end = int(xp.max(leftpad + count))
        if end > terms.key_length:
            raise ValueError(f"key_leftpad + seqlens_k must be at most S = {terms.key_length}; got {end}")


def _lengths(p: Prepared, terms: ExtraTerms) -> tuple[Any, Any, Any]:
    """``(seqlens_q, seqlens_k, key_leftpad)`` as int64 ``(B, 1, 1, 1)`` arrays on ``p``'s device (defaults filled)."""
    xp = p.xp
    b = terms.batch[0]

    def column(x: Any, default: int) -> Any:
        if x is None:
            return xp.full((b, 1, 1, 1), default, dtype=xp.int64, device=p.device)
        return xp.reshape(xp.astype(x, xp.int64), (b, 1, 1, 1))

    leftpad = column(terms.key_leftpad, 0)
    seqlens_k = (column(terms.seqlens_k, 0) if terms.seqlens_k is not None
                 else terms.key_length - leftpad)
    return column(terms.seqlens_q, terms.length), seqlens_k, leftpad


def supports_padding() -> None:
    """Declare that the running mechanism's pattern needs no per-sequence alignment beyond the padding
    mask (or that it aligns through :func:`sequence_offset`)."""
    terms = _ACTIVE.get()
    if terms is not None:
        terms.aligned = True


def sequence_offset(p: Prepared, alignment: str, offset: int) -> Any:
    """The diagonal offset δ of ``alignment`` (query i sits at key position i + δ) for ``p``'s grid.

    Without padded lengths: ``offset`` (the mechanism's :func:`~reflex.mechanisms._patterns.causal_offset`).
    With them: an int64 ``(B, 1, 1, 1)`` array, ``key_leftpad`` (``"top_left"``) or ``key_leftpad +
    seqlens_k − seqlens_q`` (``"bottom_right"``), which broadcasts against the index grids as an int
    does. Calling it declares that the mechanism aligns per sequence.
    """
    terms = _ACTIVE.get()
    if terms is None or not terms.padded or tuple(p.score_shape) != terms.grid:
        return offset
    terms.aligned = True
    seqlens_q, seqlens_k, leftpad = _lengths(p, terms)
    return leftpad if alignment == "top_left" else leftpad + seqlens_k - seqlens_q


def _padding_term(p: Prepared, terms: ExtraTerms) -> Any:
    """``(rows, cols) -> (B, 1, l, s)`` boolean: query row valid and key column valid."""
    seqlens_q, seqlens_k, leftpad = _lengths(p, terms)

    def valid(rows: Any, cols: Any) -> Any:
        return (rows < seqlens_q) & (cols >= leftpad) & (cols < leftpad + seqlens_k)

    return valid


class _GatheredArray:
    """An array term ``(..., H, L, S)``-broadcastable read at the gather kernel's key lists:
    ``term(rows, cols) = array[..., rows, cols]`` with ``cols (..., H, l, K)`` (−1 padding reads key 0,
    which the kernel masks)."""

    def __init__(self, p: Prepared, array: Any) -> None:
        xp = p.xp
        self.xp = xp
        self.array = xp.broadcast_to(xp.reshape(array, (1,) * (len(p.score_shape) - array.ndim) + tuple(array.shape)),
                                     p.score_shape)

    def __call__(self, rows: Any, cols: Any) -> Any:
        xp = self.xp
        i0, count = int(rows[0, 0]), int(rows.shape[0])
        index = xp.where(cols < 0, 0, cols)
        block = self.array[..., i0:i0 + count, :]
        shape = tuple(max(a, b) for a, b in zip(block.shape[:-1], index.shape[:-1]))
        return xp.take_along_axis(xp.broadcast_to(block, (*shape, block.shape[-1])),
                                  xp.broadcast_to(index, (*shape, index.shape[-1])), axis=-1)


def _terms(t: Any) -> list[Any]:
    if t is None:
        return []
    return list(t) if isinstance(t, (tuple, list)) else [t]


def extend(kernel: str, p: Prepared, mask: Any, bias: Any, softcap: float | None) -> tuple[Any, Any, float | None]:
    """An engine call's ``(mask, bias, softcap)`` with the running mechanism's extra terms appended.

    Outside :func:`extra_terms`, unchanged. Raises ``NotImplementedError`` for a call over another
    grid than the mechanism's, or padded lengths on a mechanism that does not align per sequence,
    and ``ValueError`` when the call has its own softcap and the caller asked another.
    """
    terms = _ACTIVE.get()
    if terms is None:
        return mask, bias, softcap
    if tuple(p.score_shape) != terms.grid:
        raise NotImplementedError(
            f"{terms.function}: {_given(terms)} compose with engine calls over the mechanism's own (..., H, L, S) = "
            f"{terms.grid} grid; this mechanism attends over {tuple(p.score_shape)} (compressed, pooled or regrouped "
            f"keys or heads), where they have no meaning")
    if terms.used:
        raise NotImplementedError(f"{terms.function} makes more than one engine call (passes composed one after "
                                  f"another, not partials merged by lse): {_given(terms)} have no single pattern to "
                                  f"compose with")
    if terms.padded and not terms.aligned:
        raise NotImplementedError(f"{terms.function} does not align its pattern per sequence: seqlens_q/seqlens_k/"
                                  f"key_leftpad are not supported (see docs/conventions.md, padded batches)")
    masks, biases = _terms(mask), _terms(bias)
    extra_masks = [] if terms.mask is None else [check_term(p, "mask", terms.mask, boolean=True)]
    extra_biases = [] if terms.bias is None else [check_term(p, "bias", terms.bias, boolean=False)]
    if terms.padded:
        extra_masks.append(_padding_term(p, terms))
    if kernel == "gather":
        extra_masks = [m if callable(m) and not hasattr(m, "shape") else _GatheredArray(p, m) for m in extra_masks]
        extra_biases = [b if callable(b) and not hasattr(b, "shape") else _GatheredArray(p, b) for b in extra_biases]
    if terms.softcap is not None:
        if softcap is not None and not math.isclose(softcap, terms.softcap, rel_tol=0.0, abs_tol=0.0):
            raise ValueError(f"{terms.function}: softcap={terms.softcap} conflicts with the mechanism's own softcap "
                             f"{softcap}")
        softcap = terms.softcap
    terms.used += 1
    new_masks, new_biases = masks + extra_masks, biases + extra_biases
    return (new_masks or None), (new_biases or None), softcap


def extend_dropout(p: Prepared, dropout: Any) -> Any:
    """An engine call's :class:`~.dropout.Dropout` with the running mechanism's ``dropout_mask``/``dropout_p``.

    Called by each kernel right after :func:`extend` (which checks the grid and counts the call). The
    keep mask applies to the call's P·V product: ``O = (P∘M)·V/(1 − p)``, lse undropped. ``ValueError``
    when the call has its own dropout.
    """
    terms = _ACTIVE.get()
    if terms is None or (terms.dropout_mask is None and terms.dropout_p is None):
        return dropout
    from reflex.mechanisms._engine.dropout import check_dropout

    caller = check_dropout(p, terms.dropout_mask, 0.0 if terms.dropout_p is None else terms.dropout_p)
    if caller is None:
        return dropout
    if dropout is not None:
        raise ValueError(f"{terms.function}: dropout_mask= conflicts with the mechanism's own dropout")
    return caller
