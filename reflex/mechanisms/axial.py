"""Axial attention: the sequence as a (rows, cols) grid, attention along rows then columns (Ho et al. 2019)."""

from __future__ import annotations

from typing import Any

from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, qkv
from reflex.mechanisms._patterns import Pattern, explicit_mask
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["axial_attention"]

AXES = (None, "rows", "cols")


def axis_pattern(axis: str, cols: int) -> Pattern:
    """Same row (``⌊i/c⌋ = ⌊j/c⌋``) or same column (``i mod c = j mod c``) of a row-major grid."""
    if axis == "rows":
        return Pattern(allowed=lambda r, c: r // cols == c // cols,
                       tile_active=lambda i0, i1, j0, j1: j0 // cols <= (i1 - 1) // cols and (j1 - 1) // cols >= i0 // cols)
    return Pattern(allowed=lambda r, c: r % cols == c % cols)


def _check(p: _kernels.Prepared, shape: Any, axis: Any) -> tuple[int, int, Any]:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape)):
        raise ValueError(f"shape must be (rows, cols) of positive ints; got {shape!r}")
    rows, cols = int(shape[0]), int(shape[1])
    if not p.length == p.key_length == rows * cols:
        raise ValueError(f"shape {rows}x{cols} needs L = S = {rows * cols}; got L = {p.length}, S = {p.key_length}")
    if axis not in AXES:
        raise ValueError(f"axis must be None (rows then cols), 'rows' or 'cols'; got {axis!r}")
    return rows, cols, axis


@typed_options()
def axial_attention(q: Any, k: Any, v: Any, /, *, shape: tuple[int, int], axis: str | None = None,
                    scale: float | None = None, return_lse: bool = False, compute_dtype: Any = None,
                    implementation: str = "auto") -> Any:
    """Axial attention on a row-major (rows, cols) grid: along rows, along columns, or rows then columns.

    .. math::

        \\mathrm{Row}(V)_i = \\mathrm{softmax}_{j:\\ \\lfloor j/c \\rfloor = \\lfloor i/c \\rfloor}(s_{ij})\\, v_j,
        \\qquad
        \\mathrm{Col}(V)_i = \\mathrm{softmax}_{j:\\ j \\bmod c = i \\bmod c}(s_{ij})\\, v_j,
        \\qquad O = \\mathrm{Col}(\\mathrm{Row}(V))

    with ``s_ij = scale·q_i·k_j``. Position p of the sequence is grid cell ``(p // cols, p % cols)``.
    The default (``axis=None``) applies the row attention, then the column attention to its
    output with the same q and k (two stacked axial layers with shared projections): every output
    then depends on every value, at O(n·(rows + cols)) cost. ``axis="rows"`` / ``"cols"`` is one
    step.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, L, D)``, ``v (..., G, L, E)`` with ``L = rows·cols``
    → ``out (..., H, L, E)``; GQA by head groups (the row output, one per query head, is the value
    of the column step).

    Args:
        shape: ``(rows, cols)``.
        axis: None (rows then columns), ``"rows"`` or ``"cols"``.
        scale, compute_dtype, implementation: as :func:`full_attention`, for each step.
        return_lse: also return the logsumexp of the last softmax step.

    One step equals ``full_attention`` with the row or column mask; the registry pattern of
    ``axis=None`` is the union of both (the keys a query attends in either step).

    Reference: Ho et al. 2019, "Axial Attention in Multidimensional Transformers", §3 (eq. 3–4).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    rows, cols, axis = _check(p, shape, axis)
    scale = _kernels.resolve_scale(scale, p.dim)
    if axis is not None:
        pattern = axis_pattern(axis, cols)
        return _kernels.softmax_attention(p, scale=scale, mask=pattern.allowed, tile_active=pattern.tile_active,
                                          implementation=implementation, return_lse=return_lse)
    row_pattern = axis_pattern("rows", cols)
    row_out = _kernels.softmax_attention(p, scale=scale, mask=row_pattern.allowed, tile_active=row_pattern.tile_active,
                                         implementation=implementation)
    xp = p.xp
    head_of_kv = xp.arange(p.heads, dtype=xp.int64, device=p.device) // p.group
    k_per_head = xp.take(p.k, head_of_kv, axis=p.k.ndim - 3)
    second = _kernels.prepare(p.q, k_per_head, row_out, compute_dtype=compute_dtype)
    return _kernels.softmax_attention(second, scale=scale, mask=axis_pattern("cols", cols).allowed,
                                      implementation=implementation, return_lse=return_lse)

def _vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, **params: Any) -> dict:
    """VJP of :func:`axial_attention` through the engine's backward.

    One axis: one engine call, its backward. Both axes: ``O₁ = A_rows(q, k, v)`` then ``O =
    A_cols(q, k_h, O₁)`` with ``k_h`` the kv heads repeated per query head; backward in reverse:
    the column step gives ``dq₂``, ``dk_h`` and ``dO₁ = dv₂``, the row step ``dq₁, dk₁, dv``; then
    ``dq = dq₁ + dq₂`` and ``dk = dk₁ + Σ_{heads of the group} dk_h``.
    """
    result, calls = _kernels.run_recorded(axial_attention, inputs, params, return_lse=d_lse is not None)
    if len(calls) == 1:
        g = calls[0].backward(d_out, d_lse)
        return {"q": g.dq, "k": g.dk, "v": g.dv}
    rows_call, cols_call = calls
    p = rows_call.p
    xp = p.xp
    g2 = cols_call.backward(d_out, d_lse)
    g1 = rows_call.backward(g2.dv)
    dk_heads = xp.reshape(g2.dk, (*p.batch, p.kv_heads, p.group, p.key_length, p.dim))
    return {"q": g1.dq + g2.dq, "k": g1.dk + xp.sum(dk_heads, axis=-3), "v": g1.dv}



def _pattern(q: Any, k: Any, v: Any, /, *, shape: tuple[int, int], axis: str | None = None, **_: Any) -> Any:
    """Row, column, or (axis=None) row ∪ column mask as a boolean ``(..., H, L, S)`` array."""
    p = _kernels.prepare(q, k, v)
    _, cols, axis = _check(p, shape, axis)
    if axis is None:
        def allowed(r: Any, c: Any) -> Any:
            return axis_pattern("rows", cols).allowed(r, c) | axis_pattern("cols", cols).allowed(r, c)
    else:
        allowed = axis_pattern(axis, cols).allowed
    return explicit_mask(p.xp, p.device, p.score_shape, allowed)


def _cases(size: str, seed: int) -> list[Case]:
    rows, cols = {"tiny": (3, 4), "small": (4, 5), "medium": (8, 8), "large": (16, 16)}[size]
    gqa = qkv(seed, heads=4, kv_heads=2, length=rows * cols, key_length=rows * cols, dim=8, value_dim=6)
    return [
        Case("rows_then_cols", gqa, {"shape": [rows, cols]}, seed=seed),
        Case("rows", gqa, {"shape": [rows, cols], "axis": "rows"}, seed=seed),
        Case("cols", gqa, {"shape": [rows, cols], "axis": "cols"}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    cols = max(1, int(seq ** 0.5))
    rows = max(1, seq // cols)
    return Case("example", example_qkv(rows * cols, heads, dim, seed), {"shape": [rows, cols]}, seed=seed)


register(Mechanism(
    key="axial",
    function=axial_attention,
    family="B. position-sparse",
    paper="Ho et al. 2019 §3 (axial attention)",
    params={
        "shape": "(rows, cols) with L = S = rows * cols, row-major",
        "axis": "None (rows then cols) | 'rows' | 'cols'",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    pattern=_pattern,
    vjp=_vjp,
))
