"""Sparse Transformer factorised patterns: "strided" and "fixed" (Child et al. 2019)."""

from __future__ import annotations

from typing import Any

from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._patterns import (Pattern, causal_offset, check_alignment, check_positive_int, explicit_mask)
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["strided_attention"]

VARIANTS = ("strided", "fixed")


def strided_pattern(stride: int, variant: str, summary: int, causal: bool, offset: int) -> Pattern:
    """The union of the two factorised heads as one mask; a = i + δ is query i's position.

    ``"strided"``: ``a − l < j ≤ a`` or ``(a − j) mod l = 0`` (non-causal: ``|a − j| < l`` or the
    modulus); ``"fixed"``: ``⌊j/l⌋ = ⌊a/l⌋`` or ``j mod l ≥ l − c``; causal adds ``j ≤ a``.
    """

    def allowed(rows: Any, cols: Any) -> Any:
        position = rows + offset
        rel = position - cols
        if variant == "strided":
            local = (rel < stride) & (rel > -stride)
            ok = local | (rel % stride == 0)
        else:
            ok = (cols // stride == position // stride) | (cols % stride >= stride - summary)
        return ok & (rel >= 0) if causal else ok

    def tile_active(i0: int, i1: int, j0: int, j1: int) -> bool:
        return not causal or j0 <= i1 - 1 + offset

    return Pattern(allowed=allowed, tile_active=tile_active)


def _check(stride: Any, variant: Any, summary: Any, causal: Any, alignment: Any) -> tuple[int, str, int, bool, str]:
    stride = check_positive_int("stride", stride)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    summary = check_positive_int("summary", summary)
    if summary > stride:
        raise ValueError(f"summary (c = {summary}) must be at most the stride (l = {stride})")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False; got {causal!r}")
    return stride, variant, summary, causal, check_alignment(alignment)


@typed_options()
def strided_attention(q: Any, k: Any, v: Any, /, *, stride: int, variant: str = "strided", summary: int = 1,
                      causal: bool = True, alignment: str = "top_left", scale: float | None = None,
                      return_lse: bool = False, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Sparse Transformer attention: the strided or fixed factorised pattern, merged into one head.

    .. math::

        \\text{strided: } A_i = \\{ j : a_i - l < j \\le a_i \\} \\cup \\{ j \\le a_i : (a_i - j) \\bmod l = 0 \\}

        \\text{fixed: } A_i = \\{ j \\le a_i : \\lfloor j/l \\rfloor = \\lfloor a_i/l \\rfloor \\}
            \\cup \\{ j \\le a_i : j \\bmod l \\in \\{l - c, \\dots, l - 1\\} \\}

    with ``a_i = i + δ`` and O_i = softmax over A_i of ``scale·q_i·k_j``, times v_j. This is the
    "merged head" form (Child et al. 2019, §4.3, eq. 4 applied to A⁽¹⁾ ∪ A⁽²⁾); the interleaved
    form is two calls with ``sparse_pattern``. Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``,
    ``v (..., G, S, E)`` → ``out (..., H, L, E)``; GQA by head groups.

    Args:
        stride: l ≥ 1 (the paper uses l ≈ √n).
        variant: ``"strided"`` (§4.2, for data with a periodic structure, e.g. images) or
            ``"fixed"`` (§4.2, for text).
        summary: c, 1 ≤ c ≤ l: the last c positions of each block that every later query attends
            (fixed variant only).
        causal: True (the paper's autoregressive form: j ≤ a_i); False drops that constraint
            (strided then uses |a_i − j| < l).
        alignment: ``"top_left"`` (δ = 0) or ``"bottom_right"`` (δ = S − L).
        scale, return_lse, compute_dtype, implementation: as :func:`full_attention`.

    A row with no allowed key outputs 0 and lse −∞. The output equals ``full_attention`` with the
    pattern as a boolean mask.

    Reference: Child et al. 2019, "Generating Long Sequences with Sparse Transformers", §4.2–4.3.
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    stride, variant, summary, causal, alignment = _check(stride, variant, summary, causal, alignment)
    pattern = strided_pattern(stride, variant, summary, causal, causal_offset(alignment, p.length, p.key_length))
    return _kernels.softmax_attention(p, scale=_kernels.resolve_scale(scale, p.dim), mask=pattern.allowed,
                                      tile_active=pattern.tile_active, implementation=implementation,
                                      return_lse=return_lse)


def _pattern(q: Any, k: Any, v: Any, /, *, stride: int, variant: str = "strided", summary: int = 1,
             causal: bool = True, alignment: str = "top_left", **_: Any) -> Any:
    """The merged pattern as a boolean ``(..., H, L, S)`` mask."""
    p = _kernels.prepare(q, k, v)
    stride, variant, summary, causal, alignment = _check(stride, variant, summary, causal, alignment)
    pattern = strided_pattern(stride, variant, summary, causal, causal_offset(alignment, p.length, p.key_length))
    return explicit_mask(p.xp, p.device, p.score_shape, pattern.allowed)


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    gqa = qkv(seed, heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    stride = max(2, int(round(d["S"] ** 0.5)))
    return [
        Case("strided", gqa, {"stride": stride}, seed=seed),
        Case("fixed", gqa, {"stride": stride, "variant": "fixed", "summary": 1}, seed=seed),
        Case("fixed_bidirectional", gqa, {"stride": stride, "variant": "fixed", "summary": 2, "causal": False},
             seed=seed),
        Case("strided_bottom_right", gqa, {"stride": 3, "alignment": "bottom_right"}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", example_qkv(seq, heads, dim, seed), {"stride": max(2, int(round(seq ** 0.5)))}, seed=seed)


register(Mechanism(
    key="strided",
    function=strided_attention,
    family="B. position-sparse",
    paper="Child et al. 2019 §4.2-4.3 (Sparse Transformer strided and fixed patterns)",
    params={
        "stride": "l: local width and stride",
        "variant": "'strided' | 'fixed'",
        "summary": "c: last c positions of each block are summaries (fixed)",
        "causal": "True (default, j <= i + d) | False",
        "alignment": "'top_left' | 'bottom_right'",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    pattern=_pattern,
    vjp=_kernels.engine_vjp(strided_attention),
))
