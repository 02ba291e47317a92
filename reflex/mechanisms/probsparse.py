"""ProbSparse attention (Informer): only the u most "active" queries attend; the rest take mean(V)."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._patterns import causal_offset, parse_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["probsparse_attention", "probsparse_sparsity"]


def _informer_count(factor: int, n: int) -> int:
    """``min(n, factor·⌈ln n⌉)`` (Informer's u and U_part; 0 when n = 1)."""
    return min(n, factor * math.ceil(math.log(n))) if n > 0 else 0


def _check_samples(p: _kernels.Prepared, sample_indices: Any) -> Any:
    xp = p.xp
    if namespace(sample_indices) is not xp or device_of(sample_indices) != p.device:
        raise TypeError(f"sample_indices must come from the same array library and device as q ({p.device})")
    if not xp.isdtype(sample_indices.dtype, "integral"):
        raise TypeError(f"sample_indices must be an integer array of key positions; got dtype {sample_indices.dtype}")
    shape = tuple(int(n) for n in sample_indices.shape)
    if len(shape) != 2 or shape[0] != p.length or shape[1] < 1:
        raise ValueError(f"sample_indices must have shape (L, n) = ({p.length}, n) with n >= 1; got {shape}")
    low, high = int(xp.min(sample_indices)), int(xp.max(sample_indices))
    if low < 0 or high >= p.key_length:
        raise ValueError(f"sample_indices must lie in [0, {p.key_length}); got values in [{low}, {high}]")
    return xp.astype(sample_indices, xp.int64)


def probsparse_sparsity(p: _kernels.Prepared, sample_indices: Any, scale: float, block: int = 4096) -> Any:
    """``M(q_i) = max_j s_ij − mean_j s_ij`` over each query's sampled keys ``(L, n)`` → ``(..., H, L)``.

    ``s = scale·q·k``; duplicates in a sample count in the mean. Query blocks keep memory O(block·n·D).
    """
    xp = p.xp
    count = int(sample_indices.shape[-1])
    q = xp.reshape(p.q * scale, (*p.batch, p.kv_heads, p.group, p.length, 1, p.dim))
    pieces = []
    for i0 in range(0, p.length, block):
        i1 = min(i0 + block, p.length)
        keys = xp.take(p.k, xp.reshape(sample_indices[i0:i1, :], (-1,)), axis=-2)  # (..., G, l·n, D)
        keys = xp.reshape(keys, (*p.batch, p.kv_heads, 1, i1 - i0, count, p.dim))
        s = xp.vecdot(q[..., i0:i1, :, :], keys, axis=-1)  # (..., G, H/G, l, n)
        pieces.append(xp.max(s, axis=-1) - xp.mean(s, axis=-1))
    sparsity = xp.concat(pieces, axis=-1) if len(pieces) != 1 else pieces[0]
    return xp.reshape(sparsity, (*p.batch, p.heads, p.length))


@typed_options()
def probsparse_attention(q: Any, k: Any, v: Any, /, *, factor: int = 5, top_u: int | None = None,
                         sample_indices: Any = None, num_samples: int | None = None, seed: Any = None,
                         causal: bool | str = False, scale: float | None = None, compute_dtype: Any = None,
                         implementation: str = "auto") -> Any:
    """ProbSparse self-attention (Informer): the top-u queries by sparsity M attend; the rest output mean(V).

    .. math::

        M(q_i) = \\max_{j \\in \\mathcal S_i} s_{ij} - \\frac{1}{n}\\sum_{j \\in \\mathcal S_i} s_{ij},
        \\qquad s_{ij} = \\mathrm{scale}\\; q_i \\cdot k_j,

        o_i = \\begin{cases} \\mathrm{softmax}(s_{i\\cdot})\\,V & i \\in \\mathrm{top}_u(M)\\\\
        \\overline{V} & \\text{otherwise}\\end{cases}

    (Zhou et al. 2021, "Informer", §3.1 eq. 3–4 and Lemma 1; Alg. 1 of the appendix). ``𝒮_i`` are n
    sampled keys per query (with replacement, shared by batch and heads, as the official code).
    ``V̄`` is the mean over all keys, or with ``causal`` the cumulative mean over ``j ≤ i + δ``
    (0 when no key is visible). Selected queries attend with the causal mask when causal.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``.

    Args:
        factor: c; ``u = min(L, c·⌈ln L⌉)`` queries attend and ``n = min(S, c·⌈ln S⌉)`` keys are
            sampled (Informer's defaults; L = 1 gives u = 0).
        top_u: override u (``top_u = L``: every query attends, i.e. ``full_attention``).
        sample_indices: ``(L, n)`` int key positions, explicit; or ``seed`` (and optionally
            ``num_samples`` n) to draw them with :func:`reflex.random.integers`. Not needed when
            u ∈ {0, L}.
        causal: ``False``; ``True``/``"top_left"`` or ``"bottom_right"``.
        scale: default 1/√D. implementation: engine kernel for the selected queries' softmax.

    Decided here, against the official code: M uses the mean over the n samples (the code divides
    the sampled sum by S), and the causal lazy output is a cumulative *mean* (the code uses a
    cumulative sum). M is not masked by causality (as the code). Ties in M → lower query index.
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    for name, value in (("factor", factor), ("top_u", top_u), ("num_samples", num_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (1 if name != "top_u" else 0)):
            raise ValueError(f"{name} must be an int >= {1 if name != 'top_u' else 0}; got {value!r}")
    u = _informer_count(factor, p.length) if top_u is None else top_u
    if u > p.length:
        raise ValueError(f"top_u must be at most L = {p.length}; got {top_u}")
    s = _kernels.resolve_scale(scale, p.dim)
    alignment = parse_causal(causal)
    offset = None if alignment is None else causal_offset(alignment, p.length, p.key_length)
    lazy = _lazy_output(p, offset)
    if u == 0 or p.key_length == 0:
        return lazy
    positions = xp.arange(p.length, dtype=xp.int64, device=p.device)
    if u == p.length:
        chosen = xp.broadcast_to(positions, (*p.batch, p.heads, p.length))
    else:
        if sample_indices is None:
            if seed is None:
                raise ValueError("pass sample_indices (L, n) or a seed to draw them (no hidden randomness)")
            n = _informer_count(factor, p.key_length) if num_samples is None else num_samples
            sample_indices = random.integers((p.length, max(1, n)), seed=seed, low=0, high=p.key_length, xp=xp,
                                             device=p.device)
        elif seed is not None or num_samples is not None:
            raise ValueError("pass either sample_indices or (num_samples, seed), not both")
        sparsity = probsparse_sparsity(p, _check_samples(p, sample_indices), s)
        chosen = xp.sort(xp.argsort(-sparsity, axis=-1, stable=True)[..., :u], axis=-1)  # (..., H, u) ascending
    q_rows = xp.take_along_axis(p.q, xp.broadcast_to(chosen[..., None], (*chosen.shape, p.dim)), axis=-2)
    mask = None
    if offset is not None:
        cols = xp.arange(p.key_length, dtype=xp.int64, device=p.device)
        mask = cols <= chosen[..., None] + offset  # (..., H, u, S)
    selected = _kernels.prepare(q_rows, p.k, p.v, compute_dtype=p.q.dtype)
    active = _kernels.softmax_attention(selected, scale=s, mask=mask, implementation=implementation)  # (..., H, u, E)
    # scatter: query i, if chosen, is row (number of chosen queries before i) of `active`
    is_chosen = xp.any(positions[:, None] == chosen[..., None, :], axis=-1) if u != p.length else None
    if is_chosen is None:
        return active
    slot = xp.cumulative_sum(xp.astype(is_chosen, xp.int64), axis=-1) - 1
    slot = xp.where(slot < 0, 0, slot)
    spread = xp.take_along_axis(active, xp.broadcast_to(slot[..., None], (*slot.shape, p.value_dim)), axis=-2)
    return xp.where(is_chosen[..., None], spread, lazy)


def _lazy_output(p: _kernels.Prepared, offset: int | None) -> Any:
    """mean(V) for every query, or the cumulative mean over keys j ≤ i + δ (0 if none) → ``(..., H, L, E)``."""
    xp = p.xp
    shape = (*p.batch, p.kv_heads, p.group, p.length, p.value_dim)
    if p.key_length == 0:
        return xp.zeros((*p.batch, p.heads, p.length, p.value_dim), dtype=p.q.dtype, device=p.device)
    if offset is None:
        mean = xp.mean(p.v, axis=-2, keepdims=True)[..., None, :, :]  # (..., G, 1, 1, E)
        return xp.reshape(xp.broadcast_to(mean, shape), shape[:-4] + (p.heads, p.length, p.value_dim))
    last = xp.arange(p.length, dtype=xp.int64, device=p.device) + offset  # last visible key per query
    counts = xp.astype(xp.arange(1, p.key_length + 1, dtype=xp.int64, device=p.device), p.q.dtype)
    cumulative = xp.cumulative_sum(p.v, axis=-2) / counts[:, None]  # (..., G, S, E)
    rows = xp.take(cumulative, xp.clip(last, 0, p.key_length - 1), axis=-2)  # (..., G, L, E)
    rows = xp.where((last >= 0)[:, None], rows, 0.0)
    return xp.reshape(xp.broadcast_to(rows[..., None, :, :], shape), (*p.batch, p.heads, p.length, p.value_dim))


def _lazy_output_vjp(p: _kernels.Prepared, offset: int | None, d_lazy: Any) -> Any:
    """``dV (..., G, S, E)`` of :func:`_lazy_output` from ``d_lazy (..., H, L, E)`` (rows not read are 0).

    Mean: ``dv_j = Σ_i d_i / S``. Cumulative mean: row i reads ``c_t = (1/(t+1))Σ_{j≤t} v_j`` at
    ``t = clip(i + δ, 0, S − 1)`` (nothing when i + δ < 0): ``dc_t = Σ_{i → t} d_i`` (a deterministic
    scatter-add), ``dv_j = Σ_{t ≥ j} dc_t/(t + 1)`` (a reversed prefix sum).
    """
    from reflex.backends.scatter import scatter_add
    from reflex.mechanisms import _grad

    xp = p.xp
    per_kv = xp.sum(_grad.group_queries(p, d_lazy), axis=-3)  # (..., G, L, E)
    if offset is None:
        total = xp.sum(per_kv, axis=-2, keepdims=True) / float(p.key_length)
        return xp.broadcast_to(total, tuple(p.v.shape))
    last = xp.arange(p.length, dtype=xp.int64, device=p.device) + offset
    per_kv = xp.where((last >= 0)[:, None], per_kv, 0.0)
    lead = tuple(per_kv.shape[:-2])
    nb = len(lead)
    rows = xp.reshape(xp.permute_dims(per_kv, (nb, *range(nb), nb + 1)), (p.length, -1))  # (L, ...·E)
    d_cum = scatter_add(xp.clip(last, 0, p.key_length - 1), rows, p.key_length)  # (S, ...·E)
    d_cum = xp.permute_dims(xp.reshape(d_cum, (p.key_length, *lead, p.value_dim)), (*range(1, nb + 1), 0, nb + 1))
    counts = xp.astype(xp.arange(1, p.key_length + 1, dtype=xp.int64, device=p.device), p.q.dtype)
    scaled = d_cum / counts[:, None]
    return xp.flip(xp.cumulative_sum(xp.flip(scaled, axis=-2), axis=-2), axis=-2)


def _probsparse_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, factor: int = 5, top_u: int | None = None,
                    num_samples: int | None = None, seed: Any = None, causal: bool | str = False,
                    scale: float | None = None, compute_dtype: Any = None, implementation: str = "auto") -> dict:
    """VJP of :func:`probsparse_attention`: ``{"q": dq, "k": dk, "v": dv}``. The sampled keys and the top-u
    selection are constants (the forward's branch; ties to the lower query index), so M contributes no
    gradient.

    Selected rows: the engine's backward (dense, or tiled: FlashAttention-2 Alg. 2) on the selected
    queries with their rows of ``dO`` gives their ``dq`` (scattered back to their positions), ``dK``,
    ``dV``; the other rows' ``dO`` reaches V through the (cumulative) mean, :func:`_lazy_output_vjp`.
    """
    from reflex.mechanisms import _grad

    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = p.xp
    sample_indices = inputs.get("sample_indices")
    u = _informer_count(factor, p.length) if top_u is None else top_u
    s = _kernels.resolve_scale(scale, p.dim)
    alignment = parse_causal(causal)
    offset = None if alignment is None else causal_offset(alignment, p.length, p.key_length)
    d_o = xp.astype(d_out, p.q.dtype)
    zeros_q, zeros_k = (xp.zeros(x.shape, dtype=p.q.dtype, device=p.device) for x in (p.q, p.k))
    if u == 0 or p.key_length == 0:
        return {"q": zeros_q, "k": zeros_k, "v": _lazy_output_vjp(p, offset, d_o)}
    positions = xp.arange(p.length, dtype=xp.int64, device=p.device)
    if u == p.length:
        chosen = xp.broadcast_to(positions, (*p.batch, p.heads, p.length))
    else:
        if sample_indices is None:
            if seed is None:
                raise ValueError("pass sample_indices (L, n) or a seed to draw them (no hidden randomness)")
            n = _informer_count(factor, p.key_length) if num_samples is None else num_samples
            sample_indices = random.integers((p.length, max(1, n)), seed=seed, low=0, high=p.key_length, xp=xp,
                                             device=p.device)
        sparsity = probsparse_sparsity(p, _check_samples(p, sample_indices), s)
        chosen = xp.sort(xp.argsort(-sparsity, axis=-1, stable=True)[..., :u], axis=-1)
    q_rows = xp.take_along_axis(p.q, xp.broadcast_to(chosen[..., None], (*chosen.shape, p.dim)), axis=-2)
    mask = None
    if offset is not None:
        cols = xp.arange(p.key_length, dtype=xp.int64, device=p.device)
        mask = cols <= chosen[..., None] + offset
    d_rows = xp.take_along_axis(d_o, xp.broadcast_to(chosen[..., None], (*chosen.shape, p.value_dim)), axis=-2)
    g = _grad.softmax_attention_vjp(_kernels.prepare(q_rows, p.k, p.v, compute_dtype=p.q.dtype), d_rows, scale=s,
                                    mask=mask, implementation=implementation)
    if u == p.length:
        return {"q": g.dq, "k": g.dk, "v": g.dv}
    is_chosen = xp.any(positions[:, None] == chosen[..., None, :], axis=-1)
    slot = xp.cumulative_sum(xp.astype(is_chosen, xp.int64), axis=-1) - 1
    slot = xp.where(slot < 0, 0, slot)
    spread = xp.take_along_axis(g.dq, xp.broadcast_to(slot[..., None], (*slot.shape, p.dim)), axis=-2)
    d_lazy = xp.where(is_chosen[..., None], 0.0, d_o)
    return {"q": xp.where(is_chosen[..., None], spread, 0.0), "k": g.dk, "v": g.dv + _lazy_output_vjp(p, offset, d_lazy)}


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    length = 4 * d["L"]
    shapes = dict(heads=d["H"], length=length, key_length=length + 3, dim=d["D"], value_dim=d["E"])
    gqa = qkv(seed, kv_heads=d["G"], **shapes)
    samples = random.integers((length, 5), seed=(seed, 5), low=0, high=length + 3)
    return [
        Case("sampled", {**gqa, "sample_indices": samples}, {"factor": 1}, seed=seed),
        Case("causal", {**gqa, "sample_indices": samples}, {"factor": 1, "causal": "bottom_right"}, seed=seed),
        Case("seeded_causal", gqa, {"factor": 1, "seed": seed, "causal": True}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", example_qkv(seq, heads, dim, seed), {"seed": seed}, seed=seed)


register(Mechanism(
    key="probsparse",
    function=probsparse_attention,
    family="E. query prototypes",
    paper="Zhou et al. 2021, 'Informer', §3.1 eq. 3-4",
    params={
        "factor": "c: u = min(L, c*ceil(ln L)) active queries, n = min(S, c*ceil(ln S)) samples",
        "top_u": "override u (L: every query attends)",
        "sample_indices": "(L, n) sampled key positions per query, explicit",
        "num_samples": "n when drawing sample_indices from seed",
        "seed": "draws sample_indices with reflex.random.integers (with replacement)",
        "causal": "False | True | 'top_left' | 'bottom_right' (lazy rows: cumulative mean)",
        "scale": "score scale, default 1/sqrt(D)",
    },
    vjp=_probsparse_vjp,
    cases=_cases,
    row_separable=False,
    example=_example,
))
