"""Hierarchical attention: local attention within blocks plus attention over mean-pooled block summaries."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._patterns import Pattern, check_positive_int
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["hierarchical_attention"]

COMBINES = ("sum", "concat")


def block_diagonal_pattern(block_size: int) -> Pattern:
    """Key j allowed for query i iff ``i // b == j // b`` (top-left aligned blocks)."""
    b = block_size
    return Pattern(allowed=lambda rows, cols: rows // b == cols // b,
                   tile_active=lambda i0, i1, j0, j1: j0 // b <= (i1 - 1) // b and i0 // b <= (j1 - 1) // b)


def mean_pool(xp: Any, x: Any, span: int) -> Any:
    """Means of consecutive spans of ``span`` positions along axis −2 (the last span may be shorter)."""
    length = int(x.shape[-2])
    count = -(-length // span)
    pad = count * span - length
    if pad:
        x = xp.concat([x, xp.zeros((*x.shape[:-2], pad, x.shape[-1]), dtype=x.dtype, device=device_of(x))], axis=-2)
    sums = xp.sum(xp.reshape(x, (*x.shape[:-2], count, span, x.shape[-1])), axis=-2)
    sizes = [min(span, length - u * span) for u in range(count)]
    return sums / xp.asarray(sizes, dtype=x.dtype, device=device_of(x))[:, None]


@typed_options()
def hierarchical_attention(q: Any, k: Any, v: Any, /, *, block_size: int, levels: int = 2, combine: str = "sum",
                           w_o: Any = None, scale: float | None = None, compute_dtype: Any = None,
                           implementation: str = "auto") -> Any:
    """Hierarchical attention: block-local attention plus attention over mean-pooled summaries, combined.

    .. math::

        O^{(0)} = \\mathrm{softmax}\\big(\\mathrm{scale}\\,QK^\\top + \\log M_b\\big) V, \\quad
        M_b[i, j] = [\\lfloor i/b \\rfloor = \\lfloor j/b \\rfloor];\\qquad
        O^{(\\ell)} = \\mathrm{softmax}\\big(\\mathrm{scale}\\,Q \\bar K_\\ell^\\top\\big) \\bar V_\\ell,
        \\quad \\ell = 1, \\dots, \\mathrm{levels} - 1

    where ``K̄_ℓ``, ``V̄_ℓ`` are means over consecutive spans of ``b^ℓ`` keys/values (the last span
    may be shorter and is averaged over the positions it has). Combined by ``G``:
    ``"sum"`` → ``Σ_ℓ O^(ℓ)``; ``"concat"`` → ``[O^(0), …, O^(levels−1)] · W_O``.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)``, ``w_o (levels·E, F)``
    → ``(..., H, L, E)`` (sum) or ``(..., H, L, F)`` (concat).

    Args:
        block_size: b ≥ 1, the local block and the pooling factor per level.
        levels: ≥ 1; one level is exactly block-local attention (``block_local`` with no look-back).
        combine: ``"sum"`` or ``"concat"`` (then ``w_o`` is required).
        w_o: the concat projection.
        scale, compute_dtype: as :func:`reflex.full_attention`; ``implementation`` applies to the
            block-local level (its pattern skips empty tiles); summary levels are dense
            (``L × S/b^ℓ``).

    Every query attends every summary at each coarse level (no causal variant); blocks are aligned
    top-left (query i and key j share block ⌊i/b⌋ = ⌊j/b⌋).

    References: Zhu & Soricut 2021, "H-Transformer-1D: Fast One-Dimensional Hierarchical Attention
    for Sequences", ACL, §4–5 (levels of coarsened keys/values by averaging); catalogue seed
    "hierarchical attention".
    """
    b = check_positive_int("block_size", block_size)
    levels = check_positive_int("levels", levels)
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}; got {combine!r}")
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    scale = _kernels.resolve_scale(scale, p.dim)
    if combine == "concat":
        if w_o is None:
            raise ValueError("combine='concat' needs w_o of shape (levels * E, F)")
        w_o = _kernels.check_array(xp, p.device, p.q.dtype, "w_o", w_o)
        if w_o.ndim != 2 or int(w_o.shape[0]) != levels * p.value_dim:
            raise ValueError(f"w_o must have shape (levels * E, F) = ({levels * p.value_dim}, F); got {tuple(w_o.shape)}")
    elif w_o is not None:
        raise ValueError("w_o is only used with combine='concat'")
    block = block_diagonal_pattern(b)
    outputs = [_kernels.softmax_attention(p, scale=scale, mask=block.allowed, tile_active=block.tile_active,
                                          implementation=implementation)]
    for level in range(1, levels):
        span = b ** level
        summary = _kernels.prepare(p.q, mean_pool(xp, p.k, span), mean_pool(xp, p.v, span), compute_dtype=p.q.dtype)
        outputs.append(_kernels.softmax_attention(summary, scale=scale, implementation="dense"))
    if combine == "sum":
        out = outputs[0]
        for extra in outputs[1:]:
            out = out + extra
        return out
    return xp.concat(outputs, axis=-1) @ w_o

def mean_pool_vjp(xp: Any, d_pooled: Any, span: int, length: int) -> Any:
    """The adjoint of :func:`mean_pool`: position j receives ``d_pooled[⌊j/span⌋] / size⌊j/span⌋``."""
    count = int(d_pooled.shape[-2])
    sizes = [min(span, length - u * span) for u in range(count)]
    per_span = d_pooled / xp.asarray(sizes, dtype=d_pooled.dtype, device=device_of(d_pooled))[:, None]
    owner = xp.arange(length, dtype=xp.int64, device=device_of(d_pooled)) // span
    return xp.take(per_span, owner, axis=per_span.ndim - 2)


def _vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, **params: Any) -> dict:
    """VJP of :func:`hierarchical_attention` through the engine's backward.

    One engine call per level, ``O^{(ℓ)} = A(Q, \\bar K_ℓ, \\bar V_ℓ)`` with mean-pooled keys and
    values. ``sum``: every level receives ``dO``; ``concat``: ``dC = dO·w_oᵀ`` split by level and
    ``d w_o = Cᵀ·dO`` (summed over batch, heads and rows). Each level's ``dk``, ``dv`` go back
    through :func:`mean_pool_vjp`; ``dq`` is the sum over levels.
    """
    result, calls = _kernels.run_recorded(hierarchical_attention, inputs, params, return_lse=False)
    p = calls[0].p
    xp = p.xp
    d_out = xp.astype(d_out, p.q.dtype)
    b = int(params["block_size"])
    grads: dict = {}
    if params.get("combine", "sum") == "concat":
        w_o = xp.astype(inputs["w_o"], p.q.dtype)
        outputs = xp.concat([c.out for c in calls], axis=-1)
        flat_out = xp.reshape(outputs, (-1, int(outputs.shape[-1])))
        grads["w_o"] = xp.matrix_transpose(flat_out) @ xp.reshape(d_out, (-1, int(d_out.shape[-1])))
        d_concat = d_out @ xp.matrix_transpose(w_o)
        e = p.value_dim
        level_d_out = [d_concat[..., n * e:(n + 1) * e] for n in range(len(calls))]
    else:
        level_d_out = [d_out] * len(calls)
    dq = dk = dv = None
    for level, (call, d_level) in enumerate(zip(calls, level_d_out)):
        g = call.backward(d_level)
        gk, gv = g.dk, g.dv
        if level:
            gk = mean_pool_vjp(xp, gk, b ** level, p.key_length)
            gv = mean_pool_vjp(xp, gv, b ** level, p.key_length)
        dq, dk, dv = (g.dq, gk, gv) if dq is None else (dq + g.dq, dk + gk, dv + gv)
    grads.update(q=dq, k=dk, v=dv)
    return grads



def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    gqa = qkv(seed, **shapes)
    w_o = random.normal((3 * d["E"], d["E"]), seed=(seed, 5))
    return [
        Case("two_levels_sum", gqa, {"block_size": 2}, seed=seed),
        Case("three_levels_concat", {**gqa, "w_o": w_o}, {"block_size": 2, "levels": 3, "combine": "concat"}, seed=seed),
        Case("one_level", gqa, {"block_size": 3, "levels": 1}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    """Blocks of b = min(16, max(2, seq // 4)); one summary level per span b^ℓ < seq."""
    b = min(16, max(2, seq // 4))
    levels = 1
    while b ** levels < seq:
        levels += 1
    return Case("example", example_qkv(seq, heads, dim, seed), {"block_size": b, "levels": levels}, seed=seed)


register(Mechanism(
    key="hierarchical",
    function=hierarchical_attention,
    family="I. memory, recurrence, hierarchy, routing",
    paper="Zhu & Soricut 2021 (H-Transformer-1D), ACL, §4-5",
    params={
        "block_size": "b: local block size and pooling factor per level",
        "levels": "number of levels (1 = block-local only)",
        "combine": "'sum' | 'concat' (with w_o)",
        "w_o": "(levels * E, F) projection for combine='concat'",
    },
    cases=_cases,
    example=_example,
    vjp=_vjp,
))
