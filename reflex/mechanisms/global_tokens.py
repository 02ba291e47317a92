"""Global-token attention: listed positions attend to all and are attended by all; others see globals + self."""

from __future__ import annotations

import bisect
from typing import Any

from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._patterns import (Pattern, causal_offset, check_alignment, check_positions, explicit_mask,
                                         lookup_flags, position_flags)
from reflex.mechanisms.sliding_window import check_band_implementation, band_module
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["global_attention"]


def global_pattern(xp: Any, device: Any, positions: tuple[int, ...], key_length: int, offset: int) -> Pattern:
    """Query i (at position a = i + δ) attends key j iff a ∈ G, j ∈ G or j = a."""
    flags = position_flags(xp, device, positions, key_length)

    def allowed(rows: Any, cols: Any) -> Any:
        position = rows + offset
        inside = (position >= 0) & (position < key_length)
        query_global = lookup_flags(xp, flags, xp.where(inside, position, -1)) & inside
        return query_global | lookup_flags(xp, flags, cols) & (cols >= 0) | (cols == position)

    def _any_in(lo: int, hi: int) -> bool:  # a global position in [lo, hi)?
        n = bisect.bisect_left(positions, lo)
        return n < len(positions) and positions[n] < hi

    def tile_active(i0: int, i1: int, j0: int, j1: int) -> bool:
        diagonal = j0 <= i1 - 1 + offset and j1 - 1 >= i0 + offset
        return diagonal or _any_in(i0 + offset, i1 + offset) or _any_in(j0, j1)

    return Pattern(allowed=allowed, tile_active=tile_active)


@typed_options()
def global_attention(q: Any, k: Any, v: Any, /, *, global_indices: Any, alignment: str = "top_left",
                     scale: float | None = None, return_lse: bool = False, compute_dtype: Any = None,
                     implementation: str = "auto") -> Any:
    """Global-token attention: global positions attend everything and are attended by every query.

    .. math::

        O_i = \\mathrm{softmax}_{j \\in W_i}(\\mathrm{scale}\\; q_i \\cdot k_j)\\, v_j, \\qquad
        W_i = \\begin{cases} [0, S) & a_i \\in G \\\\ G \\cup \\{a_i\\} & \\text{otherwise} \\end{cases},
        \\quad a_i = i + \\delta

    Positions are key positions: query i sits at ``a_i = i + δ`` (δ from ``alignment``); it is global
    when ``a_i ∈ G``, and it always attends its own position (when ``a_i`` is a key). Shapes:
    ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``out (..., H, L, E)``; GQA by
    head groups (the letter G of the shapes is the kv head count, not the global set).

    Args:
        global_indices: distinct positions in ``[0, S)`` (a sequence of ints or a 1-D integer array).
        alignment: ``"top_left"`` (δ = 0) or ``"bottom_right"`` (δ = S − L).
        scale, return_lse, compute_dtype: as :func:`full_attention`.
        implementation: ``"numba"`` (band kernel: each row's self range plus the global keys as
            extra keys), ``"dense"``, ``"tiled"``, or ``"auto"`` (the vectorised NumPy band kernel for plain NumPy float64; ``"numpy"``/``"numba"`` force one band kernel).

    The output equals ``full_attention`` with the pattern as a boolean mask.

    Reference: Lin et al. 2021, "A Survey of Transformers", §4.1.1 and Fig. 4(a) (global attention);
    Beltagy et al. 2020 §3.1; Zaheer et al. 2020 §2 (global tokens).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    positions = check_positions("global_indices", global_indices, p.key_length)
    offset = causal_offset(check_alignment(alignment), p.length, p.key_length)
    implementation = check_band_implementation(implementation)
    if implementation == "gather":
        raise ValueError("global has no gather kernel; use 'numba', 'dense', 'tiled' or 'auto'")
    scale = _kernels.resolve_scale(scale, p.dim)
    band_kernel = band_module(p, implementation, q, k, v)
    xp = p.xp
    if band_kernel is not None:
        flags = position_flags(xp, p.device, positions, p.key_length)
        position = xp.arange(p.length, dtype=xp.int64, device=p.device) + offset
        inside = (position >= 0) & (position < p.key_length)
        query_global = lookup_flags(xp, flags, xp.where(inside, position, -1)) & inside
        lo = xp.where(query_global, 0, position)
        hi = xp.where(query_global, p.key_length - 1, position)
        out, lse = band_kernel.range_attention(p.q, p.k, p.v, lo, hi, scale=scale, key_ok=~flags,
                                                extra=xp.asarray(positions, dtype=xp.int64, device=p.device))
        return (out, lse) if return_lse else out
    pattern = global_pattern(xp, p.device, positions, p.key_length, offset)
    return _kernels.softmax_attention(p, scale=scale, mask=pattern.allowed, tile_active=pattern.tile_active,
                                      implementation=implementation, return_lse=return_lse)


def _pattern(q: Any, k: Any, v: Any, /, *, global_indices: Any, alignment: str = "top_left", **_: Any) -> Any:
    """The global pattern as a boolean ``(..., H, L, S)`` mask."""
    p = _kernels.prepare(q, k, v)
    positions = check_positions("global_indices", global_indices, p.key_length)
    offset = causal_offset(check_alignment(alignment), p.length, p.key_length)
    return explicit_mask(p.xp, p.device, p.score_shape, global_pattern(p.xp, p.device, positions, p.key_length, offset).allowed)


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    gqa = qkv(seed, heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    return [
        Case("first_last", gqa, {"global_indices": [0, d["S"] - 1]}, seed=seed),
        Case("middle_bottom_right", gqa, {"global_indices": [1, d["S"] // 2], "alignment": "bottom_right"}, seed=seed),
        Case("none", gqa, {"global_indices": []}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", example_qkv(seq, heads, dim, seed), {"global_indices": sorted({0, seq // 2, seq - 1})}, seed=seed)


register(Mechanism(
    key="global",
    function=global_attention,
    family="B. position-sparse",
    paper="Lin et al. 2021 (survey) §4.1.1, Fig. 4a; Beltagy et al. 2020 §3.1; Zaheer et al. 2020 §2",
    params={
        "global_indices": "distinct key positions in [0, S): attend all, attended by all",
        "alignment": "'top_left' | 'bottom_right' (query i at position i + S - L)",
        "implementation": "'auto' | 'numba' | 'dense' | 'tiled'",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    pattern=_pattern,
    vjp=_kernels.engine_vjp(global_attention),
))
