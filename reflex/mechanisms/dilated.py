"""Dilated sliding-window attention: a band over every d-th key (Longformer §3.1)."""

from __future__ import annotations

from typing import Any

from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._engine.extra import sequence_offset
from reflex.mechanisms._patterns import (causal_offset, check_alignment, check_positive_int, check_window,
                                         dilated_band_pattern, explicit_mask)
from reflex.mechanisms.sliding_window import band_indices, check_band_implementation, band_module
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["dilated_attention"]


@typed_options()
def dilated_attention(q: Any, k: Any, v: Any, /, *, window: tuple[int, int], dilation: int, alignment: str = "top_left",
                      scale: float | None = None, return_lse: bool = False, compute_dtype: Any = None,
                      implementation: str = "auto") -> Any:
    """Dilated sliding-window attention: query i attends keys i + d·t for t in [−left, right].

    .. math::

        O_i = \\mathrm{softmax}_{j \\in W_i}(\\mathrm{scale}\\; q_i \\cdot k_j)\\, v_j, \\qquad
        W_i = \\{\\, i + \\delta + d\\,t : -\\mathrm{left} \\le t \\le \\mathrm{right} \\,\\} \\cap [0, S)

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``out (..., H, L, E)``;
    GQA: query head h reads kv head ``h // (H/G)``.

    Args:
        window: ``(left, right)`` in steps of d (ints ≥ −1, −1 = unbounded); the receptive field is
            ``d·(left + right) + 1`` positions wide with ``left + right + 1`` keys. ``(left, 0)`` is causal.
        dilation: d ≥ 1; d = 1 is :func:`sliding_window_attention`.
        alignment: ``"top_left"`` (δ = 0) or ``"bottom_right"`` (δ = S − L).
        scale, return_lse, compute_dtype: as :func:`full_attention`.
        implementation: ``"numba"`` (the band kernel on each residue class of ``(i + δ) mod d``),
            ``"dense"``, ``"tiled"``, ``"gather"``, or ``"auto"`` (the vectorised NumPy band kernel for plain NumPy float64; ``"numpy"``/``"numba"`` force one band kernel).

    A query with no key in range outputs 0 and lse −∞. The output equals ``full_attention`` with
    the dilated band as a boolean mask.

    Reference: Beltagy et al. 2020, "Longformer", §3.1 (dilated sliding window).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    left, right = check_window(window)
    dilation = check_positive_int("dilation", dilation)
    offset = causal_offset(check_alignment(alignment), p.length, p.key_length)
    implementation = check_band_implementation(implementation)
    scale = _kernels.resolve_scale(scale, p.dim)
    band_kernel = band_module(p, implementation, q, k, v)
    offset = sequence_offset(p, alignment, offset)  # per sequence with padded lengths (a (B, 1, 1, 1) array)
    if band_kernel is not None:
        out, lse = band_kernel.band_attention(p.q, p.k, p.v, left=left, right=right, offset=offset, dilation=dilation,
                                               scale=scale)
    elif implementation == "gather":
        out, lse = _kernels.gather(p, band_indices(p, left, right, offset, dilation), scale=scale)
    else:
        pattern = dilated_band_pattern(left, right, dilation, offset)
        return _kernels.softmax_attention(p, scale=scale, mask=pattern.allowed, tile_active=pattern.tile_active,
                                          implementation=implementation, return_lse=return_lse)
    return (out, lse) if return_lse else out


def _pattern(q: Any, k: Any, v: Any, /, *, window: tuple[int, int], dilation: int, alignment: str = "top_left",
             **_: Any) -> Any:
    """The dilated band as a boolean ``(..., H, L, S)`` mask."""
    p = _kernels.prepare(q, k, v)
    left, right = check_window(window)
    offset = causal_offset(check_alignment(alignment), p.length, p.key_length)
    allowed = dilated_band_pattern(left, right, check_positive_int("dilation", dilation), offset).allowed
    return explicit_mask(p.xp, p.device, p.score_shape, allowed)


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    gqa = qkv(seed, heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    return [
        Case("symmetric", gqa, {"window": [2, 2], "dilation": 2}, seed=seed),
        Case("causal", gqa, {"window": [3, 0], "dilation": 3}, seed=seed),
        Case("bottom_right", gqa, {"window": [1, 1], "dilation": 2, "alignment": "bottom_right"}, seed=seed),
        Case("unbounded_left", gqa, {"window": [-1, 0], "dilation": 2}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    w = min(64, max(1, seq // 16))
    return Case("example", example_qkv(seq, heads, dim, seed), {"window": [w, w], "dilation": 2}, seed=seed)


register(Mechanism(
    key="dilated",
    function=dilated_attention,
    family="B. position-sparse",
    paper="Beltagy et al. 2020 §3.1 (Longformer dilated sliding window)",
    params={
        "window": "(left, right) in steps of the dilation; -1 = unbounded",
        "dilation": "d >= 1: keys i + d*t",
        "alignment": "'top_left' | 'bottom_right'",
        "implementation": "'auto' | 'numba' | 'dense' | 'tiled' | 'gather'",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    pattern=_pattern,
    vjp=_kernels.engine_vjp(dilated_attention),
))
