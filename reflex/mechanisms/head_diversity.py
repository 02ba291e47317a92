"""Head diversity: disagreement regularisers across heads, and the attention-pattern guidance loss."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms._cases import dims
from reflex.mechanisms._kernels import resolve_dtype
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._numerics import vector_norm
from reflex.mechanisms._numerics import unbroadcast

__all__ = ["head_diversity"]

KINDS = ("subspace", "position", "output", "pattern")
REDUCTIONS = ("flatten", "positions")


def _mean_pairwise_cosine(xp: Any, x: Any, reduce: str) -> Any:
    """(1/H²)·Σ_{i,j} cos(x_i, x_j) for ``x (..., H, L, E)``; a zero vector has cosine 0 with everything."""
    if reduce == "flatten":
        x = xp.reshape(x, (*x.shape[:-2], 1, int(x.shape[-2]) * int(x.shape[-1])))  # one vector per head
    x = xp.permute_dims(x, (*range(x.ndim - 3), x.ndim - 2, x.ndim - 3, x.ndim - 1))  # (..., L|1, H, E)
    norms = vector_norm(xp, x, keepdims=False)
    gram = x @ xp.matrix_transpose(x)
    scale = norms[..., :, None] * norms[..., None, :]
    cosine = xp.where(scale == 0, 0.0, gram / xp.where(scale == 0, 1.0, scale))
    heads = int(x.shape[-2])
    per_row = xp.sum(cosine, axis=(-2, -1)) / float(heads * heads)
    return xp.mean(per_row, axis=-1)


@typed_options()
def head_diversity(maps: Any, /, *, kind: str, patterns: Any = None, reduce: str = "flatten",
                   compute_dtype: Any = None) -> Any:
    """Multi-head disagreement regularisers (subspace, position, output) and the pattern-guidance loss.

    .. math::

        D_{\\mathrm{subspace}} = -\\frac{1}{H^2}\\sum_{i,j}\\frac{V^i\\cdot V^j}{\\|V^i\\|\\|V^j\\|},\\quad
        D_{\\mathrm{position}} = -\\frac{1}{H^2}\\sum_{i,j}\\big|A^i\\odot A^j\\big|,\\quad
        D_{\\mathrm{output}} = -\\frac{1}{H^2}\\sum_{i,j}\\frac{O^i\\cdot O^j}{\\|O^i\\|\\|O^j\\|},\\quad
        L_{\\mathrm{pattern}} = \\sum_h \\big\\|A^h - P^h\\big\\|_F^2

    ``kind`` picks the quantity and what ``maps`` holds:
    - ``"subspace"``: ``maps`` = projected values V ``(..., H, S, E)``;
    - ``"output"``: ``maps`` = head outputs O ``(..., H, L, E)``;
    - ``"position"``: ``maps`` = attention maps A ``(..., H, L, S)``; |·| sums all entries;
    - ``"pattern"``: ``maps`` = A ``(..., H, L, S)`` and ``patterns`` P broadcastable to it (the
      guided heads' target patterns; weight the result by λ yourself).
    Returns one value per batch item, shape ``(...)``. The disagreement terms are to be *maximised*
    (added with a positive weight to the objective). The cosine terms (``"subspace"``, ``"output"``)
    are −1 (their minimum) when all heads are identical and −1/H for mutually orthogonal heads.
    ``"position"`` is not normalised and scales with the L rows: for row-stochastic maps it is −L
    (its minimum) for identical one-hot heads and −L/H for H heads attending disjoint one-hot keys.
    The cosine convention is fixed by ``reduce``: ``"flatten"`` (default) takes
    one cosine between the heads' whole matrices (Frobenius inner product); ``"positions"`` takes
    it per row and averages over rows. A zero vector has cosine 0. Arithmetic in ``compute_dtype``.

    References: Li, Tu, Yang, Lyu & Zhang 2018, "Multi-Head Attention with Disagreement
    Regularization", EMNLP, §3 (eq. 5–7); Deshpande & Narasimhan 2020, "Guiding Attention for
    Self-Supervised Learning with Transformers", Findings of EMNLP, §3 (the attention-pattern loss).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}; got {reduce!r}")
    xp = namespace(maps, patterns)
    if maps.ndim < 3:
        raise ValueError(f"maps must have shape (..., H, L, ·); got {tuple(maps.shape)}")
    dtype = resolve_dtype(xp, compute_dtype)
    m = xp.astype(maps, dtype)
    if kind in ("subspace", "output"):
        return -_mean_pairwise_cosine(xp, m, reduce)
    if kind == "position":
        heads = int(m.shape[-3])
        total = xp.sum(m, axis=-3)  # Σ_{i,j} Σ A^i A^j = Σ (Σ_i A^i)²
        return -xp.sum(total * total, axis=(-2, -1)) / float(heads * heads)
    if patterns is None:
        raise ValueError("kind='pattern' needs patterns (..., H, L, S)")
    if device_of(patterns) != device_of(maps):
        raise ValueError(f"patterns is on device {device_of(patterns)}; maps is on {device_of(maps)}")
    diff = m - xp.astype(patterns, dtype)
    if tuple(diff.shape) != tuple(m.shape):
        raise ValueError(f"patterns of shape {tuple(patterns.shape)} do not broadcast to maps {tuple(m.shape)}")
    return xp.sum(diff * diff, axis=(-3, -2, -1))


def _mean_pairwise_cosine_vjp(xp: Any, x: Any, reduce: str, d_value: Any) -> Any:
    """Gradient of ``d_value (...) · _mean_pairwise_cosine(x)`` with respect to ``x (..., H, L, E)``.

    With unit vectors ``u_j = x_j/‖x_j‖`` (0 for a zero vector) and ``c_aj = cos(x_a, x_j)``:
    ``∂ Σ_ij c_ij / ∂x_a = (2/‖x_a‖)(Σ_j u_j − (Σ_j c_aj) u_a)``, 0 for a zero vector (its cosines are
    the constant 0); then ÷ H² and ÷ the rows averaged.
    """
    shape = tuple(x.shape)
    if reduce == "flatten":
        x = xp.reshape(x, (*x.shape[:-2], 1, int(x.shape[-2]) * int(x.shape[-1])))
    x = xp.permute_dims(x, (*range(x.ndim - 3), x.ndim - 2, x.ndim - 3, x.ndim - 1))  # (..., R, H, E)
    norms = vector_norm(xp, x)
    live = norms > 0
    safe = xp.where(live, norms, 1.0)
    unit = xp.where(live, x / safe, 0.0)
    cosine = unit @ xp.matrix_transpose(unit)
    grad = 2.0 * (xp.sum(unit, axis=-2, keepdims=True) - xp.sum(cosine, axis=-1, keepdims=True) * unit) / safe
    rows, heads = int(x.shape[-3]), int(x.shape[-2])
    grad = xp.where(live, grad, 0.0) * (d_value[..., None, None, None] / float(heads * heads * rows))
    grad = xp.permute_dims(grad, (*range(grad.ndim - 3), grad.ndim - 2, grad.ndim - 3, grad.ndim - 1))
    return xp.reshape(grad, shape)


def _head_diversity_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, kind: str, reduce: str = "flatten",
                        compute_dtype: Any = None) -> dict:
    """VJP of :func:`head_diversity`: ``d maps`` (and ``d patterns`` for ``"pattern"``), ``d_out`` of shape ``(...)``.

    Cosine kinds: see :func:`_mean_pairwise_cosine_vjp` (negated). ``"position"``:
    ``dA_h = −2 d·(Σ_i A^i)/H²``. ``"pattern"``: ``dA = 2 d (A − P)``, ``dP = −2 d (A − P)`` summed over
    the axes P was broadcast along.
    """
    from reflex.mechanisms import _grad

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    maps, patterns = inputs["maps"], inputs.get("patterns")
    xp = namespace(maps, patterns)
    dtype = resolve_dtype(xp, compute_dtype)
    m = xp.astype(maps, dtype)
    d = xp.astype(d_out, dtype)
    if kind in ("subspace", "output"):
        return {"maps": -_mean_pairwise_cosine_vjp(xp, m, reduce, d)}
    if kind == "position":
        heads = int(m.shape[-3])
        total = xp.sum(m, axis=-3, keepdims=True)
        return {"maps": xp.broadcast_to(-2.0 * total * d[..., None, None, None] / float(heads * heads), tuple(m.shape))}
    diff = 2.0 * (m - xp.astype(patterns, dtype)) * d[..., None, None, None]
    grads = {"maps": diff}
    if xp.isdtype(patterns.dtype, "real floating"):
        grads["patterns"] = unbroadcast(xp, -diff, tuple(patterns.shape))
    return grads


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    values = random.normal((2, d["H"], d["S"], d["E"]), seed=(seed, 0))
    logits = random.normal((2, d["H"], d["L"], d["S"]), seed=(seed, 1))
    weights = math.e ** logits  # host arrays: softmax maps as input data
    weights = weights / weights.sum(-1, keepdims=True)
    patterns = (random.uniform((d["H"], d["L"], d["S"]), seed=(seed, 2)) < 0.3).astype(float)
    return [
        Case("subspace", {"maps": values}, {"kind": "subspace"}, positional=("maps",), seed=seed),
        Case("output_positions", {"maps": values}, {"kind": "output", "reduce": "positions"}, positional=("maps",), seed=seed),
        Case("position", {"maps": weights}, {"kind": "position"}, positional=("maps",), seed=seed),
        Case("pattern", {"maps": weights, "patterns": patterns}, {"kind": "pattern"}, positional=("maps",), seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", {"maps": random.normal((1, heads, seq, dim), seed=(seed, 0))}, {"kind": "output"},
                positional=("maps",), seed=seed)


register(Mechanism(
    key="head_diversity",
    function=head_diversity,
    family="J. multi-head",
    paper="Li et al. 2018, Multi-Head Attention with Disagreement Regularization, EMNLP §3; Deshpande & Narasimhan 2020 §3",
    params={"kind": "'subspace' | 'position' | 'output' | 'pattern'", "patterns": "P (..., H, L, S) for 'pattern'",
            "reduce": "'flatten' (cosine of whole head matrices) | 'positions' (per-row cosine, averaged)"},
    cases=_cases,
    row_separable=False,
    example=_example,
    vjp=_head_diversity_vjp,
))
