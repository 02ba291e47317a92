"""A row/key window on the engine: compute query rows ``[i0, i1)`` against keys ``[j0, j1)`` only.

Inside ``with window(rows=(i0, i1), keys=(j0, j1)):`` every engine kernel (:func:`~.dense.dense`,
:func:`~.tiled.tiled`, :func:`~.gather.gather`) computes the rows ``i0 ≤ i < i1`` of its result from
the keys ``j0 ≤ j < j1`` only, while every index grid, causal offset, window and bias stays in
absolute positions: callable terms receive ``rows + i0`` and ``cols + j0``, array terms are sliced,
``tile_active`` sees absolute bounds, and gather key lists keep the listed keys inside the range
(shifted) and mark the others as padding. The kernel returns ``out (..., H, i1 − i0, E)`` and
``lse (..., H, i1 − i0)``; a row with no key in the range gets ``out = 0``, ``lse = −∞``, so partials
over disjoint key ranges merge exactly by logsumexp (:func:`reflex.mechanisms._merge.merge_partials`).

This is how :mod:`reflex.distributed` shards a mechanism: it runs the ordinary mechanism on the
full inputs under a window, so positional conventions never need a per-mechanism offset. The score
maps :func:`~.dense.scores` and :func:`~.dense.weights` are *not* windowed (they are selections
and maps, not results); the distributed runner checks which calls a forward made.

Differentiable callable terms lose their ``vjp`` inside a window: the window is for forward runs.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from reflex.mechanisms._inputs import Prepared

__all__ = ["Window", "window", "current_window", "restrict", "restrict_dropout"]


@dataclass(frozen=True)
class Window:
    """Query rows ``[i0, i1)`` and keys ``[j0, j1)`` (``None``: all of them). ``seen`` lists the
    unrestricted ``(L, S)`` of every engine call made inside the window, in order."""

    rows: tuple[int, int] | None = None
    keys: tuple[int, int] | None = None
    seen: list = field(default_factory=list)


_WINDOW: contextvars.ContextVar[Window | None] = contextvars.ContextVar("reflex_engine_window", default=None)


def _check_range(name: str, span: Any) -> tuple[int, int] | None:
    if span is None:
        return None
    if (not isinstance(span, tuple) or len(span) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                  for x in span)):
        raise TypeError(f"{name} must be a pair of ints (start, stop) or None; got {span!r}")
    if not 0 <= span[0] <= span[1]:
        raise ValueError(f"{name} must satisfy 0 <= start <= stop; got {span!r}")
    return span


@contextmanager
def window(*, rows: tuple[int, int] | None = None, keys: tuple[int, int] | None = None) -> Iterator[Window]:
    """Restrict every engine call (on this thread or task) inside the block to ``rows`` × ``keys``."""
    w = Window(_check_range("rows", rows), _check_range("keys", keys))
    token = _WINDOW.set(w)
    try:
        yield w
    finally:
        _WINDOW.reset(token)


def current_window() -> Window | None:
    """The window in force, or ``None``."""
    return _WINDOW.get()


def _clip(span: tuple[int, int] | None, size: int) -> tuple[int, int]:
    if span is None:
        return 0, size
    if span[1] > size:
        raise ValueError(f"the engine window {span} runs past the {size} positions of this engine call")
    return span


def _slice_array_term(t: Any, i0: int, i1: int, j0: int, j1: int) -> Any:
    """Rows i0:i1 and columns j0:j1 of an array term broadcastable to ``(..., H, L, S)``."""
    if t.ndim >= 2 and t.shape[-2] != 1:
        t = t[..., i0:i1, :]
    if t.ndim >= 1 and t.shape[-1] != 1:
        t = t[..., j0:j1]
    return t


def _shift_term(t: Any, i0: int, i1: int, j0: int, j1: int) -> Any:
    if t is None:
        return None
    if callable(t) and not hasattr(t, "shape"):
        if i0 == 0 and j0 == 0:
            return t
        return lambda rows, cols: t(rows + i0, cols + j0)
    return _slice_array_term(t, i0, i1, j0, j1)


def _shift_terms(terms: Any, i0: int, i1: int, j0: int, j1: int) -> Any:
    if terms is None:
        return None
    if isinstance(terms, (tuple, list)):
        return tuple(_shift_term(t, i0, i1, j0, j1) for t in terms)
    return _shift_term(terms, i0, i1, j0, j1)


def restrict(p: Prepared, mask: Any, bias: Any, tile_active: Any = None,
             indices: Any = None) -> tuple[Prepared, Any, Any, Any, Any]:
    """``(p, mask, bias, tile_active, indices)`` restricted to the window in force (unchanged if none)."""
    w = _WINDOW.get()
    if w is None:
        return p, mask, bias, tile_active, indices
    w.seen.append((p.length, p.key_length))
    i0, i1 = _clip(w.rows, p.length)
    j0, j1 = _clip(w.keys, p.key_length)
    if (i0, i1, j0, j1) == (0, p.length, 0, p.key_length):
        return p, mask, bias, tile_active, indices
    xp, all_keys = p.xp, (j0, j1) == (0, p.key_length)
    q, k, v = p.q[..., i0:i1, :], p.k[..., j0:j1, :], p.v[..., j0:j1, :]
    p = replace(p, q=q, k=k, v=v, length=i1 - i0, key_length=j1 - j0)
    mask, bias = _shift_terms(mask, i0, i1, j0, j1), _shift_terms(bias, i0, i1, j0, j1)
    if tile_active is not None:
        inner = tile_active
        tile_active = lambda a, b, c, d: inner(a + i0, b + i0, c + j0, d + j0)  # noqa: E731
    if indices is not None:
        indices = indices[..., i0:i1, :] if indices.shape[-2] != 1 else indices
        if not all_keys:
            inside = (indices >= j0) & (indices < j1)
            indices = xp.where(inside, indices - j0, xp.full_like(indices, -1))
    return p, mask, bias, tile_active, indices


def restrict_dropout(p: Prepared, dropout: Any) -> Any:
    """A :class:`~.dropout.Dropout` whose keep mask is restricted to the window in force as :func:`restrict`
    restricts mask terms (sliced, or callables shifted to absolute positions); ``p`` is the unrestricted call."""
    w = _WINDOW.get()
    if w is None or dropout is None:
        return dropout
    i0, i1 = _clip(w.rows, p.length)
    j0, j1 = _clip(w.keys, p.key_length)
    if (i0, i1, j0, j1) == (0, p.length, 0, p.key_length):
        return dropout
    return replace(dropout, keep=_shift_term(dropout.keep, i0, i1, j0, j1))
