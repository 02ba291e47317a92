"""Index-grid patterns shared by mechanisms: causal alignment and the argument checks around it.

A :class:`Pattern` is a vectorised FlexAttention ``mask_mod``: ``allowed(rows, cols)`` maps integer
index grids (``rows (l, 1)``, ``cols (1, s)``, or gathered ``(..., H, l, K)``) to a boolean array,
True = attend. ``tile_active(i0, i1, j0, j1)`` says whether the tile rows ``[i0, i1)`` × columns
``[j0, j1)`` can hold an allowed pair; the tiled kernel skips tiles where it is False.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Pattern", "ALIGNMENTS", "parse_causal", "causal_offset", "causal_pattern", "check_window", "band_pattern"]

ALIGNMENTS = ("top_left", "bottom_right")


@dataclass(frozen=True)
class Pattern:
    """``allowed(rows, cols) -> bool array`` and an optional conservative tile filter."""

    allowed: Callable[[Any, Any], Any]
    tile_active: Callable[[int, int, int, int], bool] | None = None


def parse_causal(causal: Any) -> str | None:
    """``False`` → None; ``True`` or ``"top_left"`` → ``"top_left"``; ``"bottom_right"`` as is."""
    if causal is False or causal is None:
        return None
    if causal is True:
        return "top_left"
    if isinstance(causal, str) and causal in ALIGNMENTS:
        return causal
    raise ValueError(f"causal must be False, True, 'top_left' or 'bottom_right'; got {causal!r}")


def causal_offset(alignment: str, length: int, key_length: int) -> int:
    """Diagonal offset δ so that query i sits at key position i + δ.

    ``"top_left"``: δ = 0 (query i aligns with key i, torch SDPA ``is_causal``);
    ``"bottom_right"``: δ = S − L (the last query aligns with the last key, flash-attn, KV caches).
    """
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}; got {alignment!r}")
    return 0 if alignment == "top_left" else key_length - length


def causal_pattern(alignment: str, length: int, key_length: int) -> Pattern:
    """Key j is allowed for query i iff j ≤ i + δ (see :func:`causal_offset`)."""
    offset = causal_offset(alignment, length, key_length)
    return Pattern(
        allowed=lambda rows, cols: cols <= rows + offset,
        tile_active=lambda i0, i1, j0, j1: j0 <= i1 - 1 + offset,
    )


def check_window(window: Any) -> tuple[int, int]:
    """``window=(left, right)`` as two ints ≥ −1 (−1 = unbounded on that side)."""
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window)):
        raise ValueError(f"window must be (left, right) with ints >= -1 (-1 = unbounded); got {window!r}")
    return int(window[0]), int(window[1])


def band_pattern(left: int, right: int, offset: int = 0) -> Pattern:
    """Key j allowed for query i iff i + δ − left ≤ j ≤ i + δ + right; −1 leaves that side unbounded.

    ``offset`` δ aligns queries with keys (see :func:`causal_offset`). ``(left, 0)`` is causal
    attention with a look-back of ``left`` keys; ``(0, 0)`` is self only.
    """

    def allowed(rows: Any, cols: Any) -> Any:
        rel = cols - rows - offset
        if left >= 0 and right >= 0:
            return (rel >= -left) & (rel <= right)
        if left >= 0:
            return rel >= -left
        if right >= 0:
            return rel <= right
        return rel == rel  # unbounded both ways: everything

    def tile_active(i0: int, i1: int, j0: int, j1: int) -> bool:
        lowest, highest = j0 - (i1 - 1) - offset, (j1 - 1) - i0 - offset
        return (right < 0 or lowest <= right) and (left < 0 or highest >= -left)

    return Pattern(allowed=allowed, tile_active=tile_active)


# --- content-based selection (issue 5: topk, block_topk, indexer_topk, adaptive, lsh) ----------
# Top-k selection with a documented tie rule, and the key multiplicities of an index list: the
# explicit pattern a gathered mechanism equals ``full_attention`` under.

__all__ += ["top_indices", "index_counts"]


def top_indices(xp: Any, scores: Any, count: int) -> Any:
    """Positions of the ``count`` largest ``scores`` along the last axis, best first, as int64.

    Ties are broken by the lower index (a stable ascending sort of ``−scores``). Entries whose score
    is −∞ (masked) are never selected: their slots hold −1 (padding for ``_kernels.gather``), so a
    row with fewer than ``count`` finite scores is padded at the end.
    """
    count = min(int(count), int(scores.shape[-1]))
    order = xp.argsort(-scores, axis=-1, stable=True)[..., :count]
    chosen = xp.take_along_axis(scores, order, axis=-1)
    return xp.where(chosen == -math.inf, xp.asarray(-1, dtype=order.dtype, device=order.device),
                    xp.astype(order, xp.int64))


def index_counts(xp: Any, indices: Any, key_length: int) -> Any:
    """How often each key ``j < key_length`` appears in ``indices (..., K)`` → int64 ``(..., key_length)``.

    ``-1`` entries (padding) are ignored. Memory O(… × key_length); a test and pattern helper.
    """
    keys = xp.arange(key_length, dtype=xp.int64, device=indices.device)
    counts = xp.zeros((*indices.shape[:-1], key_length), dtype=xp.int64, device=indices.device)
    for slot in range(int(indices.shape[-1])):
        counts = counts + xp.astype(indices[..., slot:slot + 1] == keys, xp.int64)
    return counts

