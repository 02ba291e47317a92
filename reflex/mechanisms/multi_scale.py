"""Multi-scale attention: band attention with a different window per head."""

from __future__ import annotations

from typing import Any, Sequence

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import standard
from reflex.mechanisms._patterns import band_pattern, causal_offset, check_window
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["multi_scale_attention"]


def _head_windows(head_windows: Any, heads: int) -> list[tuple[int, int]]:
    if not isinstance(head_windows, (list, tuple)) or len(head_windows) != heads:
        raise ValueError(f"head_windows must list one window per head ({heads}); got {head_windows!r}")
    windows = []
    for w in head_windows:
        if isinstance(w, int) and not isinstance(w, bool):
            w = (w, w)
        windows.append(check_window(w))
    return windows


@typed_options()
def multi_scale_attention(q: Any, k: Any, v: Any, /, *, head_windows: Sequence[int | tuple[int, int]],
                          alignment: str = "top_left", mask: Any = None, scale: float | None = None,
                          return_lse: bool = False, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Multi-scale attention: query head h attends the keys within its own window ω_h.

    .. math::

        O_h = \\mathrm{softmax}\\big(\\mathrm{scale}\\cdot Q_h K_{g(h)}^\\top + \\log M_h\\big) V_{g(h)},
        \\qquad (M_h)_{ij} = [\\, -\\ell_h \\le j - i - \\delta \\le r_h \\,]

    Shapes as :func:`reflex.full_attention`. ``head_windows`` lists one window per query head: an
    int ω (symmetric, ``(ω, ω)``: 2ω + 1 keys) or a ``(left, right)`` pair as in
    :func:`reflex.sliding_window_attention`, −1 = unbounded on that side (``(ω, 0)`` is a causal
    look-back). ``alignment`` places query i at key position i + δ: ``"top_left"`` (δ = 0) or
    ``"bottom_right"`` (δ = S − L). The per-head band is one index-grid mask term; tiles outside the
    widest band are skipped. ``mask``/``scale`` as in :func:`reflex.full_attention`. A query whose
    window holds no key outputs 0 (lse −∞).

    The paper assigns scales to heads by layer (small windows in lower layers); which head gets
    which ω is the caller's choice here.

    Reference: Guo, Qiu, Liu & Zhang 2020, "Multi-Scale Self-Attention for Text Classification",
    AAAI, §3 (eq. 4–6).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    windows = _head_windows(head_windows, p.heads)
    offset = causal_offset(alignment, p.length, p.key_length)
    unbounded = p.length + p.key_length + 1  # wider than any j − i − δ
    left = xp.reshape(xp.asarray([unbounded if w[0] < 0 else w[0] for w in windows], dtype=xp.int64, device=p.device),
                      (p.heads, 1, 1))
    right = xp.reshape(xp.asarray([unbounded if w[1] < 0 else w[1] for w in windows], dtype=xp.int64, device=p.device),
                       (p.heads, 1, 1))

    def in_band(rows: Any, cols: Any) -> Any:
        rel = cols - rows - offset
        return (rel >= -left) & (rel <= right)

    widest = band_pattern(-1 if any(w[0] < 0 for w in windows) else max(w[0] for w in windows),
                          -1 if any(w[1] < 0 for w in windows) else max(w[1] for w in windows), offset)
    masks = [_kernels.check_term(p, "mask", mask, boolean=True), in_band]
    return _kernels.softmax_attention(p, scale=_kernels.resolve_scale(scale, p.dim), mask=masks,
                                      tile_active=widest.tile_active, implementation=implementation,
                                      return_lse=return_lse)


def _pattern(q: Any, k: Any, v: Any, /, *, head_windows: Any, alignment: str = "top_left", mask: Any = None, **_: Any) -> Any:
    """The explicit boolean ``(..., H, L, S)`` pattern: per-head bands (ANDed with ``mask``)."""
    p = _kernels.prepare(q, k, v)
    xp = p.xp
    rows = xp.reshape(xp.arange(p.length, dtype=xp.int64, device=p.device), (p.length, 1))
    cols = xp.reshape(xp.arange(p.key_length, dtype=xp.int64, device=p.device), (1, p.key_length))
    rel = cols - rows - causal_offset(alignment, p.length, p.key_length)
    heads = []
    for left, right in _head_windows(head_windows, p.heads):
        band = (rel >= -left) if left >= 0 else (rel == rel)
        heads.append(band & (rel <= right) if right >= 0 else band)
    allowed = xp.broadcast_to(xp.stack(heads, axis=0), p.score_shape)
    return allowed if mask is None else allowed & mask


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    n = d["L"]
    return [
        Case("symmetric", gqa, {"head_windows": [0, 1, n // 2, n]}, seed=seed),
        Case("causal_scales", gqa, {"head_windows": [[1, 0], [2, 0], [n, 0], [-1, 0]], "alignment": "bottom_right"}, seed=seed),
        Case("mixed", gqa, {"head_windows": [[0, 2], -1, [3, -1], 1]}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    inputs = {name: random.normal((1, heads, seq, dim), seed=(seed, i)) for i, name in enumerate("qkv")}
    return Case("example", inputs, {"head_windows": [2 ** h for h in range(heads)]}, seed=seed)


register(Mechanism(
    key="multi_scale",
    function=multi_scale_attention,
    family="J. multi-head",
    paper="Guo, Qiu, Liu & Zhang 2020, Multi-Scale Self-Attention for Text Classification, AAAI, §3",
    params={"head_windows": "one window per head: int ω = (ω, ω) or (left, right), -1 unbounded",
            "alignment": "'top_left' (query i at key i) | 'bottom_right' (at i + S - L)", "mask": "as full"},
    cases=_cases,
    returns_lse=True,
    pattern=_pattern,
    example=_example,
    # one engine call with mask terms only: the engine's backward is the VJP (dq, dk, dv)
    vjp=_kernels.engine_vjp(multi_scale_attention),
))
