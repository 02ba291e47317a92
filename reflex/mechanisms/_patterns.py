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

from reflex.mechanisms import _kernels

__all__ = ["Pattern", "ALIGNMENTS", "parse_causal", "causal_offset", "causal_pattern", "check_window", "band_pattern",
           "check_alignment", "check_positive_int", "dilated_band_pattern", "check_positions", "position_flags",
           "lookup_flags", "all_patterns", "any_pattern", "explicit_mask"]

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
    return 0 if check_alignment(alignment) == "top_left" else key_length - length


def causal_pattern(alignment: str, length: int, key_length: int) -> Pattern:
    """Key j is allowed for query i iff j ≤ i + δ (see :func:`causal_offset`)."""
    offset = causal_offset(alignment, length, key_length)
    return Pattern(
        allowed=lambda rows, cols: cols <= rows + offset,
        tile_active=lambda i0, i1, j0, j1: j0 <= i1 - 1 + offset,
    )


def check_window(window: Any) -> tuple[int, int]:
    """``window=(left, right)`` as two ints ≥ −1; −1 or ``None`` leaves that side unbounded.

    ``None`` is flash-attn 4's spelling of an unbounded side, −1 that of flash-attn 2/3's kernels; both
    read the same here. (FA4's interface reads any other negative value literally unless
    left + right < 0; reflex refuses values below −1 instead.)
    """
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or any(w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < -1) for w in window)):
        raise ValueError(f"window must be (left, right) with ints >= -1 or None (-1 and None = unbounded); "
                         f"got {window!r}")
    return tuple(-1 if w is None else int(w) for w in window)  # type: ignore[return-value]


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

    # a per-sequence offset array (B, 1, 1, 1) (padded batches): every tile may hold an allowed pair
    return Pattern(allowed=allowed, tile_active=tile_active if isinstance(offset, int) else None)


__all__ += ["chunk_pattern", "sink_band_pattern"]


def chunk_pattern(chunk: int, offset: Any) -> Pattern:
    """Llama-4 chunked attention (flash-attn 3 ``attention_chunk``): query i sees the keys of its own chunk.

    Query i sits at key position ``t = i + δ`` with δ the bottom-right offset S − L (whatever the
    causal alignment; per sequence with padded lengths, an array) and sees
    ``c·⌊t/c⌋ ≤ j < c·⌊t/c⌋ + c`` (floor division, also for negative t). Compose with causal or a
    window by intersection (:func:`all_patterns`).
    """

    def allowed(rows: Any, cols: Any) -> Any:
        t = rows + offset
        start = t - t % chunk  # floor: % of a negative int is non-negative in the array API
        return (cols >= start) & (cols < start + chunk)

    def tile_active(i0: int, i1: int, j0: int, j1: int) -> bool:
        first = (i0 + offset) // chunk * chunk
        last = (i1 - 1 + offset) // chunk * chunk + chunk
        return j1 - 1 >= first and j0 < last

    return Pattern(allowed=allowed, tile_active=tile_active if isinstance(offset, int) else None)


def sink_band_pattern(left: int, right: int, offset: Any, sink_tokens: int) -> Pattern:
    """:func:`band_pattern` whose first ``sink_tokens`` keys escape the left bound (StreamingLLM sink tokens).

    Key j is allowed for query i iff ``j ≤ i + δ + right`` and (``j ≥ i + δ − left`` or
    ``j < sink_tokens``): a sink key is still bound on the right, so a query sitting on a sink
    position sees the sinks up to its right bound (flash-attn's ``sink_token_length`` in its local
    mask, Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks", §3.2).
    """
    band = band_pattern(left, right, offset)
    if sink_tokens == 0 or left < 0:
        return band
    right_only = band_pattern(-1, right, offset)

    def allowed(rows: Any, cols: Any) -> Any:
        return band.allowed(rows, cols) | (right_only.allowed(rows, cols) & (cols < sink_tokens))

    def tile_active(i0: int, i1: int, j0: int, j1: int) -> bool:
        return band.tile_active(i0, i1, j0, j1) or (j0 < sink_tokens and right_only.tile_active(i0, i1, j0, j1))

    return Pattern(allowed=allowed, tile_active=tile_active if band.tile_active is not None else None)


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


# --- position-sparse helpers (sliding_window, dilated, global, block_local, longformer, star, ...) ----

def check_alignment(alignment: Any) -> str:
    """``alignment`` is ``"top_left"`` (query i at key position i) or ``"bottom_right"`` (at i + S − L)."""
    if not isinstance(alignment, str) or alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}; got {alignment!r}")
    return alignment


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum``; a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def dilated_band_pattern(left: int, right: int, dilation: int, offset: int = 0) -> Pattern:
    """Key j allowed for query i iff j = i + δ + d·t with −left ≤ t ≤ right (−1 = unbounded side).

    ``dilation`` d = 1 is :func:`band_pattern`. The tile filter is the band's (conservative).
    """
    band = band_pattern(-1 if left < 0 else left * dilation, -1 if right < 0 else right * dilation, offset)
    if dilation == 1:
        return band

    def allowed(rows: Any, cols: Any) -> Any:
        return band.allowed(rows, cols) & ((cols - rows - offset) % dilation == 0)

    return Pattern(allowed=allowed, tile_active=band.tile_active)


def check_positions(name: str, positions: Any, length: int) -> tuple[int, ...]:
    """A list of distinct token positions in ``[0, length)`` as sorted Python ints.

    Accepts a sequence of ints or a 1-D integer array (read back to the host: a small sync).
    """
    if hasattr(positions, "shape"):
        if len(positions.shape) != 1:
            raise ValueError(f"{name} must be 1-D; got shape {tuple(positions.shape)}")
        positions = [int(positions[n]) for n in range(int(positions.shape[0]))]
    if not isinstance(positions, (list, tuple)) or any(isinstance(g, bool) or not isinstance(g, int) for g in positions):
        raise ValueError(f"{name} must be a sequence of ints; got {positions!r}")
    bad = [g for g in positions if not 0 <= g < length]
    if bad:
        raise ValueError(f"{name} must lie in [0, {length}); got {bad}")
    if len(set(positions)) != len(positions):
        raise ValueError(f"{name} must be distinct; got {list(positions)}")
    return tuple(sorted(int(g) for g in positions))


def position_flags(xp: Any, device: Any, positions: tuple[int, ...], length: int) -> Any:
    """Boolean ``(length,)``: True at the listed positions."""
    index = xp.arange(length, dtype=xp.int64, device=device)
    flags = xp.zeros((length,), dtype=xp.bool, device=device)
    for g in positions:
        flags = flags | (index == g)
    return flags


def lookup_flags(xp: Any, flags: Any, index: Any) -> Any:
    """``flags[index]`` for an integer grid of any shape (−1 padding reads ``flags[0]``)."""
    flat = xp.reshape(xp.where(index < 0, 0, index), (-1,))
    return xp.reshape(xp.take(flags, flat, axis=0), index.shape)


def all_patterns(*patterns: Pattern) -> Pattern:
    """Intersection: allowed where every pattern allows; a tile is active where every one says so."""

    def allowed(rows: Any, cols: Any) -> Any:
        result = patterns[0].allowed(rows, cols)
        for pat in patterns[1:]:
            result = result & pat.allowed(rows, cols)
        return result

    def tile_active(i0: int, i1: int, j0: int, j1: int) -> bool:
        return all(pat.tile_active is None or pat.tile_active(i0, i1, j0, j1) for pat in patterns)

    return Pattern(allowed=allowed, tile_active=tile_active)


def any_pattern(*patterns: Pattern) -> Pattern:
    """Union: allowed where any pattern allows; a tile is active where any one may be (None = always)."""

    def allowed(rows: Any, cols: Any) -> Any:
        result = patterns[0].allowed(rows, cols)
        for pat in patterns[1:]:
            result = result | pat.allowed(rows, cols)
        return result

    def tile_active(i0: int, i1: int, j0: int, j1: int) -> bool:
        return any(pat.tile_active is None or pat.tile_active(i0, i1, j0, j1) for pat in patterns)

    return Pattern(allowed=allowed, tile_active=tile_active)


__all__ += ["mask_and_causal"]


def mask_and_causal(p: Any, mask: Any, causal: Any, *,
                    per_sequence: bool = False) -> tuple[list[Any], Callable[[int, int, int, int], bool] | None]:
    """The mask terms of ``full_attention``'s ``mask=`` and ``causal=`` options: ``(terms, tile_active)``.

    ``per_sequence``: the mechanism takes padded lengths (``seqlens_q``/``seqlens_k``/``key_leftpad``,
    :mod:`reflex.mechanisms._engine.extra`): the causal diagonal is aligned per sequence."""
    from reflex.mechanisms._engine.extra import sequence_offset, supports_padding

    terms: list[Any] = [] if mask is None else [_kernels.check_term(p, "mask", mask, boolean=True)]
    alignment = parse_causal(causal)
    if per_sequence:
        supports_padding()
    if alignment is None:
        return terms, None
    offset = sequence_offset(p, alignment, causal_offset(alignment, p.length, p.key_length)) if per_sequence else 0
    if not isinstance(offset, int):
        return terms + [band_pattern(-1, 0, offset).allowed], None
    pattern = causal_pattern(alignment, p.length, p.key_length)
    return terms + [pattern.allowed], pattern.tile_active


def explicit_mask(xp: Any, device: Any, score_shape: tuple[int, ...], allowed: Callable[[Any, Any], Any]) -> Any:
    """The boolean ``score_shape = (..., H, L, S)`` array of ``allowed`` on the full index grids."""
    length, key_length = score_shape[-2], score_shape[-1]
    rows = xp.reshape(xp.arange(length, dtype=xp.int64, device=device), (length, 1))
    cols = xp.reshape(xp.arange(key_length, dtype=xp.int64, device=device), (1, key_length))
    return xp.broadcast_to(allowed(rows, cols), score_shape)
