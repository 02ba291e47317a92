"""Importance-gated (adaptive) attention: keys restricted to the most important fraction, plus a local window."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import standard
from reflex.mechanisms._patterns import band_pattern, causal_offset, causal_pattern, check_window, mask_and_causal, parse_causal, top_indices
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["adaptive_attention", "adaptive_keys"]


def _kept(p: _kernels.Prepared, importance: Any, keep: Any) -> Any:
    """Boolean ``(..., 1 or H, S)``: the ``ceil(keep·S)`` most important keys (ties → lower index)."""
    xp = p.xp
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1]; got {keep!r}")
    score = _kernels.check_array(xp, p.device, p.q.dtype, "importance", importance)
    target = (*p.batch, p.heads, p.key_length)
    shape = tuple(int(n) for n in importance.shape)
    if not shape or shape[-1] != p.key_length or len(shape) > len(target) or not all(
            a in (1, b) for a, b in zip(shape[::-1], target[::-1])):
        raise ValueError(f"importance of shape {shape} does not broadcast to (..., H, S) = {target} with S kept")
    score = xp.reshape(score, (1,) * (len(target) - len(shape)) + shape)
    # ⌈keep·S⌉ in exact arithmetic on keep's shortest decimal form: the float product rounds across an
    # integer for some inputs (0.07 * 100 = 7.000000000000001 would keep 8 keys, not 7).
    count = max(1, math.ceil(Fraction(repr(float(keep))) * p.key_length))
    chosen = top_indices(xp, score, count)
    keys = xp.arange(p.key_length, dtype=xp.int64, device=p.device)
    kept = xp.zeros(score.shape, dtype=xp.bool, device=p.device)
    for slot in range(int(chosen.shape[-1])):
        kept = kept | (chosen[..., slot:slot + 1] == keys)
    return kept


def _allowed(p: _kernels.Prepared, kept: Any, window: Any, alignment: str | None) -> Any:
    xp = p.xp
    band = None
    if window is not None:
        left, right = check_window(window)
        band = band_pattern(left, right, causal_offset(alignment or "top_left", p.length, p.key_length))

    def allowed(rows: Any, cols: Any) -> Any:
        gate = xp.expand_dims(xp.take(kept, xp.reshape(cols, (-1,)), axis=-1), axis=-2)  # (..., 1|H, 1, s)
        return gate if band is None else gate | band.allowed(rows, cols)

    return allowed


@typed_options()
def adaptive_keys(q: Any, k: Any, importance: Any, /, *, keep: float, compute_dtype: Any = None) -> Any:
    """Boolean ``(..., 1 or H, S)``: the keys kept by importance gating (True = kept)."""
    p = _kernels.prepare(q, k, k, compute_dtype=compute_dtype)
    return _kept(p, importance, keep)


@typed_options()
def adaptive_attention(q: Any, k: Any, v: Any, importance: Any, /, *, keep: float, window: tuple[int, int] | None = None,
                       causal: bool | str = False, scale: float | None = None, return_lse: bool = False,
                       compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Adaptive (importance-gated) attention: attend the most important keys, optionally plus a local band.

    .. math::

        K^\\star = \\operatorname{top}_{\\lceil \\mathrm{keep}\\cdot S \\rceil}(\\mathrm{importance}), \\qquad
        A_i = K^\\star \\cup \\{j : i + δ - l \\le j \\le i + δ + r\\}, \\qquad
        o_i = \\mathrm{softmax}_{j \\in A_i,\\ j \\le i + δ}(\\mathrm{scale}\\; q_i \\cdot k_j)\\, V

    The seed article describes adaptive attention as restricting attention to the tokens that carry
    importance, and the hybrid as combining it with a sparse local pattern; this row fixes it as: a
    given per-key ``importance`` score (any source: a learned scorer, norms, a saliency map), the
    top fraction ``keep`` of keys by importance (ties → lower index), OR a band
    ``window=(left, right)`` (−1 = unbounded; the hybrid), AND the causal mask when causal.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)``, ``importance``
    broadcastable to ``(..., H, S)`` (per key, shared by queries) → ``(..., H, L, E)``.

    Args:
        keep: fraction in (0, 1] of keys kept: ``⌈keep·S⌉`` keys (at least 1), computed exactly on
            the decimal ``keep`` (``keep=0.07`` keeps 7 of 100 keys); ``keep=1`` is full attention.
        window: ``None`` or ``(left, right)`` band around ``i + δ`` (δ the causal offset, 0 if not causal).
        causal: ``False``, ``True``/``"top_left"``, ``"bottom_right"``. scale: default 1/√D.
        return_lse, compute_dtype, implementation: as in :func:`reflex.full_attention`.

    References: seed article 004, "Exploring Adaptive and Sparse Attention" (adaptive attention;
    "Combining Sparse and Adaptive Attention: a hybrid approach").
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    alignment = parse_causal(causal)
    masks = [_allowed(p, _kept(p, importance, keep), window, alignment)]
    causal_masks, tile_active = mask_and_causal(p, None, causal)
    masks += causal_masks
    return _kernels.softmax_attention(p, scale=_kernels.resolve_scale(scale, p.dim), mask=masks, tile_active=tile_active,
                                      implementation=implementation, return_lse=return_lse)


def _pattern(q: Any, k: Any, v: Any, importance: Any, /, *, keep: float, window: Any = None, causal: Any = False,
             compute_dtype: Any = None, **_: Any) -> Any:
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    alignment = parse_causal(causal)
    rows = xp.reshape(xp.arange(p.length, dtype=xp.int64, device=p.device), (p.length, 1))
    cols = xp.reshape(xp.arange(p.key_length, dtype=xp.int64, device=p.device), (1, p.key_length))
    allowed = _allowed(p, _kept(p, importance, keep), window, alignment)(rows, cols)
    if alignment is not None:
        allowed = allowed & causal_pattern(alignment, p.length, p.key_length).allowed(rows, cols)
    return xp.broadcast_to(allowed, p.score_shape)


def _reference(q: Any, k: Any, v: Any, importance: Any, /, *, scale: Any = None, implementation: Any = None,
               compute_dtype: Any = None, **params: Any) -> Any:
    from reflex.mechanisms.full import full_attention

    return full_attention(q, k, v, mask=_pattern(q, k, v, importance, compute_dtype=compute_dtype, **params),
                          scale=scale, compute_dtype=compute_dtype, implementation="dense")


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    shared = {**gqa, "importance": random.uniform((2, 1, d["S"]), seed=(seed, 5))}
    per_head = {**gqa, "importance": random.uniform((2, d["H"], d["S"]), seed=(seed, 6))}
    positional = ("q", "k", "v", "importance")
    return [
        Case("gated", shared, {"keep": 0.5}, positional=positional, seed=seed),
        Case("hybrid_causal", per_head, {"keep": 0.25, "window": [1, 0], "causal": True}, positional=positional, seed=seed),
        Case("hybrid", shared, {"keep": 0.3, "window": [1, 1]}, positional=positional, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    inputs = {name: random.normal((1, heads, seq, dim), seed=(seed, i)) for i, name in enumerate("qkv")}
    inputs["importance"] = random.uniform((1, 1, seq), seed=(seed, 5))
    return Case("example", inputs, {"keep": 0.25, "window": [4, 0], "causal": True},
                positional=("q", "k", "v", "importance"), seed=seed)


register(Mechanism(
    key="adaptive",
    function=adaptive_attention,
    family="C. content-sparse",
    paper="seed article 004, 'Exploring Adaptive and Sparse Attention' (adaptive and hybrid attention)",
    params={
        "importance": "per-key importance, (..., H, S)-broadcastable",
        "keep": "fraction of keys kept, in (0, 1]",
        "window": "None or (left, right) local band (the hybrid)",
        "causal": "False | True | 'top_left' | 'bottom_right'",
        "scale": "score scale, default 1/sqrt(D)",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    example=_example,
    pattern=_pattern,
    vjp=_kernels.engine_vjp(adaptive_attention, constants=("importance",)),
))
