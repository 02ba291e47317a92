"""Block-local attention: non-overlapping blocks attend within themselves (and optionally back)."""

from __future__ import annotations

from typing import Any

from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._patterns import (Pattern, causal_offset, check_alignment, check_positive_int, explicit_mask)
from reflex.mechanisms.sliding_window import check_band_implementation, band_module
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["block_local_attention"]


def block_local_pattern(block_size: int, look_back: int, causal: bool, offset: int) -> Pattern:
    """Key j allowed for query i (at position a = i + δ) iff ⌊a/b⌋ − look_back ≤ ⌊j/b⌋ ≤ ⌊a/b⌋ (and j ≤ a if causal)."""

    def allowed(rows: Any, cols: Any) -> Any:
        position = rows + offset
        gap = position // block_size - cols // block_size
        ok = (gap >= 0) & (gap <= look_back)
        return ok & (cols <= position) if causal else ok

    def tile_active(i0: int, i1: int, j0: int, j1: int) -> bool:
        first, last = i0 + offset, i1 - 1 + offset
        lo = (first // block_size - look_back) * block_size
        hi = min(last, (last // block_size + 1) * block_size - 1) if causal else (last // block_size + 1) * block_size - 1
        return j1 - 1 >= lo and j0 <= hi

    return Pattern(allowed=allowed, tile_active=tile_active)


def _check(block_size: Any, look_back: Any, causal: Any, alignment: Any) -> tuple[int, int, bool, str]:
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False; got {causal!r}")
    return (check_positive_int("block_size", block_size), check_positive_int("look_back", look_back, minimum=0),
            causal, check_alignment(alignment))


@typed_options()
def block_local_attention(q: Any, k: Any, v: Any, /, *, block_size: int, look_back: int = 0, causal: bool = False,
                          alignment: str = "top_left", scale: float | None = None, return_lse: bool = False,
                          compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Block-local attention: blocks of b positions attend within their block (and ``look_back`` before).

    .. math::

        O_i = \\mathrm{softmax}_{j \\in W_i}(\\mathrm{scale}\\; q_i \\cdot k_j)\\, v_j, \\qquad
        W_i = \\{\\, j : \\lfloor a_i/b \\rfloor - \\mathrm{look\\_back} \\le \\lfloor j/b \\rfloor
              \\le \\lfloor a_i/b \\rfloor \\,\\}, \\quad a_i = i + \\delta

    Blocks are ``[0, b), [b, 2b), …`` over key positions; the last block is partial when b ∤ S, and a
    query's block is that of its aligned position ``a_i``. Shapes: ``q (..., H, L, D)``,
    ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``out (..., H, L, E)``; GQA by head groups.

    Args:
        block_size: b ≥ 1.
        look_back: how many previous blocks each block also attends (0: "segmented" attention; 1: the
            Image Transformer's local 1-D memory of the current and previous block).
        causal: also require j ≤ a_i (decoder blocks).
        alignment: ``"top_left"`` (δ = 0) or ``"bottom_right"`` (δ = S − L).
        scale, return_lse, compute_dtype: as :func:`full_attention`.
        implementation: ``"numba"`` (band kernel with per-row key ranges), ``"dense"``, ``"tiled"``,
            or ``"auto"`` (the vectorised NumPy band kernel for plain NumPy float64; ``"numpy"``/``"numba"`` force one band kernel).

    A row with no key (a_i outside ``[0, S)``) outputs 0 and lse −∞. The output equals
    ``full_attention`` with the block pattern as a boolean mask.

    References: Liu et al. 2018, "Generating Wikipedia by Summarizing Long Sequences", §4.2.3 (local
    attention); Parmar et al. 2018, "Image Transformer", §3.2 (local 1-D attention).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    block_size, look_back, causal, alignment = _check(block_size, look_back, causal, alignment)
    offset = causal_offset(alignment, p.length, p.key_length)
    implementation = check_band_implementation(implementation)
    if implementation == "gather":
        raise ValueError("block_local has no gather kernel; use 'numba', 'dense', 'tiled' or 'auto'")
    scale = _kernels.resolve_scale(scale, p.dim)
    band_kernel = band_module(p, implementation, q, k, v)
    if band_kernel is not None:
        xp = p.xp
        position = xp.arange(p.length, dtype=xp.int64, device=p.device) + offset
        lo = (position // block_size - look_back) * block_size
        hi = (position // block_size + 1) * block_size - 1
        if causal:
            hi = xp.minimum(hi, position)
        out, lse = band_kernel.range_attention(p.q, p.k, p.v, lo, hi, scale=scale)
        return (out, lse) if return_lse else out
    pattern = block_local_pattern(block_size, look_back, causal, offset)
    return _kernels.softmax_attention(p, scale=scale, mask=pattern.allowed, tile_active=pattern.tile_active,
                                      implementation=implementation, return_lse=return_lse)


def _pattern(q: Any, k: Any, v: Any, /, *, block_size: int, look_back: int = 0, causal: bool = False,
             alignment: str = "top_left", **_: Any) -> Any:
    """The block pattern as a boolean ``(..., H, L, S)`` mask."""
    p = _kernels.prepare(q, k, v)
    block_size, look_back, causal, alignment = _check(block_size, look_back, causal, alignment)
    offset = causal_offset(alignment, p.length, p.key_length)
    return explicit_mask(p.xp, p.device, p.score_shape, block_local_pattern(block_size, look_back, causal, offset).allowed)


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    gqa = qkv(seed, heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    b = max(2, d["L"] // 3)
    return [
        Case("segmented", gqa, {"block_size": b}, seed=seed),
        Case("look_back_causal", gqa, {"block_size": b, "look_back": 1, "causal": True}, seed=seed),
        Case("bottom_right", gqa, {"block_size": 3, "alignment": "bottom_right"}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", example_qkv(seq, heads, dim, seed), {"block_size": min(256, max(1, seq // 8)), "look_back": 1},
                seed=seed)


register(Mechanism(
    key="block_local",
    function=block_local_attention,
    family="B. position-sparse",
    paper="Liu et al. 2018 §4.2.3 (local attention); Parmar et al. 2018 §3.2 (Image Transformer local 1-D)",
    params={
        "block_size": "b: blocks [0, b), [b, 2b), ...; the last may be partial",
        "look_back": "previous blocks also attended (default 0)",
        "causal": "also require j <= i + d",
        "alignment": "'top_left' | 'bottom_right'",
        "implementation": "'auto' | 'numba' | 'dense' | 'tiled'",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    pattern=_pattern,
    vjp=_kernels.engine_vjp(block_local_attention),
))
