"""Paged KV-cache attention: flash-attn's ``flash_attn_with_kvcache`` block-table layout on the engine."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace, numpy_namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._merge import add_sinks
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._sequences import (SequenceAlibi, check_sinks, check_slopes, host_ints, sequence_vjp,
                                          visible, window_sides)
from reflex.registry import Case, Mechanism, register

__all__ = ["paged_attention", "gather_pages"]


def _check_int_array(name: str, x: Any, shape: tuple[int, ...], xp: Any, device: Any) -> None:
    if not xp.isdtype(x.dtype, "integral"):
        raise TypeError(f"{name} must be an integer array (int32); got dtype {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(x.shape)}")
    if device_of(x) != device:
        raise ValueError(f"{name} is on device {device_of(x)}; q is on {device}")


def gather_pages(cache: Any, block_table: Any, cache_seqlens: Any, /) -> Any:
    """The logical key (or value) rows of each sequence: ``(B, max_blocks·block_size, G, D)``.

    Row j of sequence b is slot ``j mod block_size`` of physical block ``block_table[b, j // block_size]``.
    Rows at or beyond ``cache_seqlens[b]`` (the unused tail of the last page and unused table entries)
    are read from block 0 and must be masked by the caller. Raises ``ValueError`` when a block that
    holds a row below ``cache_seqlens[b]`` is not in ``[0, num_blocks)``.
    """
    xp = namespace(cache, block_table, cache_seqlens)
    num_blocks, block_size = int(cache.shape[0]), int(cache.shape[1])
    batch, max_blocks = int(block_table.shape[0]), int(block_table.shape[1])
    lengths = host_ints(cache_seqlens)
    table = xp.astype(block_table, xp.int64)
    for b, length in enumerate(lengths):
        if not 0 <= length <= max_blocks * block_size:
            raise ValueError(f"cache_seqlens[{b}] = {length} is outside [0, max_blocks·block_size] = "
                             f"[0, {max_blocks * block_size}]")
        used = -(-length // block_size)
        if used:
            ids = table[b, :used]
            lo, hi = int(xp.min(ids)), int(xp.max(ids))
            if lo < 0 or hi >= num_blocks:
                raise ValueError(f"block_table[{b}] lists block ids in [{lo}, {hi}] for its {length} cached tokens; "
                                 f"the cache has blocks [0, {num_blocks})")
    positions = xp.arange(max_blocks * block_size, dtype=xp.int64, device=device_of(cache))
    valid = xp.reshape(positions, (1, -1)) < xp.reshape(xp.asarray(lengths, dtype=xp.int64, device=device_of(cache)),
                                                         (-1, 1))
    blocks = xp.take(table, positions // block_size, axis=1)  # (B, S_max)
    rows = xp.where(valid, blocks, 0) * block_size + xp.reshape(positions % block_size, (1, -1))
    flat = xp.reshape(cache, (num_blocks * block_size, *cache.shape[2:]))
    return xp.reshape(xp.take(flat, xp.reshape(rows, (-1,)), axis=0), (batch, max_blocks * block_size, *cache.shape[2:]))


def _pages_adjoint(d_rows: Any, cache: Any, block_table: Any, cache_seqlens: Any) -> Any:
    """The adjoint of :func:`gather_pages`: ``d_rows (B, S_max, G, ·)`` summed into a cache-shaped array.

    Rows at or beyond a sequence's length are dropped; a block shared by several sequences (prefix
    caching) receives the sum of their cotangents, added in a fixed order (deterministic).
    """
    from reflex.backends.scatter import scatter_add

    xp = namespace(d_rows)
    num_blocks, block_size = int(cache.shape[0]), int(cache.shape[1])
    batch, max_blocks = int(block_table.shape[0]), int(block_table.shape[1])
    lengths = host_ints(cache_seqlens)
    positions = xp.arange(max_blocks * block_size, dtype=xp.int64, device=device_of(d_rows))
    table = xp.astype(block_table, xp.int64)
    rows, values = [], []
    for b, length in enumerate(lengths):
        if length:
            rows.append(xp.take(table[b, :], positions[:length] // block_size) * block_size + positions[:length] % block_size)
            values.append(xp.reshape(d_rows[b, :length, ...], (length, -1)))
    width = math.prod(int(n) for n in cache.shape[2:])
    if not rows:
        return xp.zeros(tuple(cache.shape), dtype=d_rows.dtype, device=device_of(d_rows))
    summed = scatter_add(xp.concat(rows), xp.concat(values, axis=0), num_blocks * block_size)
    return xp.reshape(summed[:, :width], tuple(cache.shape))


@typed_options(engine_options=False)  # flash-attn's own packed/paged layout
def paged_attention(q: Any, k_cache: Any, v_cache: Any, block_table: Any, cache_seqlens: Any, /, *,
                    causal: bool = False, window: Any = (-1, -1), softcap: float | None = None, sinks: Any = None,
                    alibi_slopes: Any = None, scale: float | None = None, return_lse: bool = False,
                    compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Attention over a paged KV cache (flash-attn ``flash_attn_with_kvcache``): decode and chunked prefill.

    .. math::

        O_{bi} = \\mathrm{softmax}_{j < n_b,\\ \\mathrm{visible}(r)}\\big(\\mathrm{cap}(\\mathrm{scale}\\,
        q_{bi}\\cdot K_b[j]) - m_h|r|\\big) V_b[j], \\qquad r = j - i - (n_b - L),

    where ``K_b`` concatenates the physical blocks ``block_table[b, 0], block_table[b, 1], …`` and
    ``n_b = cache_seqlens[b]`` is its length: the queries are the last L tokens of the sequence
    (bottom-right alignment, as flash-attn).

    Layout (flash-attn's, **not** reflex's usual ``(..., H, L, D)``): ``q (B, L, H, D)``,
    ``k_cache (num_blocks, block_size, G, D)``, ``v_cache (num_blocks, block_size, G, E)``,
    ``block_table (B, max_blocks)`` integer physical block ids in logical order, ``cache_seqlens (B,)``
    integer lengths. Returns ``out (B, L, H, E)`` and, with ``return_lse``, ``lse (B, H, L)``.

    Args:
        causal: key j visible iff ``r ≤ 0``. window: ``(left, right)``, visible iff
            ``−left ≤ r ≤ right`` (−1 or ``None`` = unbounded). softcap, sinks, alibi_slopes, scale:
            as :func:`reflex.varlen_attention`.

    Cache slots at or beyond ``cache_seqlens[b]`` — the tail of the last page, blocks the table does
    not use — never influence the result, even when they hold NaN or ±inf. A sequence with
    ``cache_seqlens = 0`` outputs 0 (lse −∞, or s_h with sinks). Raises ``ValueError`` for a block id
    outside the cache among the blocks a sequence uses, or a length beyond its table.
    Equals :func:`gather_pages` followed by :func:`reflex.full_attention` with the length mask.

    Gradients (:func:`reflex.vjp`): q, k_cache, v_cache (summed over every use of a shared block;
    slots no sequence reads get 0), sinks and alibi_slopes, through the engine's backward.

    Source: flash-attn ``flash_attn_with_kvcache`` (paged KV, ``block_table``), vLLM PagedAttention
    (Kwon et al. 2023, SOSP, §4.1).
    """
    xp = namespace(q, k_cache, v_cache, block_table, cache_seqlens)
    if q.ndim != 4:
        raise ValueError(f"q must have shape (B, L, H, D); got {tuple(q.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.ndim != 4:
            raise ValueError(f"{name} must have shape (num_blocks, block_size, G, dim); got {tuple(cache.shape)}")
    if tuple(k_cache.shape[:3]) != tuple(v_cache.shape[:3]):
        raise ValueError(f"v_cache has (num_blocks, block_size, G) {tuple(v_cache.shape[:3])}; k_cache has "
                         f"{tuple(k_cache.shape[:3])}")
    batch, device = int(q.shape[0]), device_of(q)
    _check_int_array("cache_seqlens", cache_seqlens, (batch,), xp, device)
    if block_table.ndim != 2 or int(block_table.shape[0]) != batch:
        raise ValueError(f"block_table must have shape (B, max_blocks) with B = {batch}; got {tuple(block_table.shape)}")
    _check_int_array("block_table", block_table, tuple(block_table.shape), xp, device)
    keys = gather_pages(k_cache, block_table, cache_seqlens)
    values = gather_pages(v_cache, block_table, cache_seqlens)
    p = _kernels.prepare(xp.permute_dims(q, (0, 2, 1, 3)), xp.permute_dims(keys, (0, 2, 1, 3)),
                         xp.permute_dims(values, (0, 2, 1, 3)), compute_dtype=compute_dtype)
    left, right = window_sides(window, causal)
    sinks = check_sinks(sinks, p.heads, xp, p.device, p.q.dtype)
    slopes = check_slopes(alibi_slopes, p.heads, xp, p.device, p.q.dtype)
    lengths = xp.reshape(xp.astype(cache_seqlens, xp.int64), (batch, 1, 1, 1))

    def relative(rows: Any, cols: Any) -> Any:  # (B, 1, l, s)
        return cols - rows - (lengths - p.length)

    def mask(rows: Any, cols: Any) -> Any:
        return (cols < lengths) & visible(relative(rows, cols), left, right)

    out, lse = _kernels.softmax_attention(
        p, scale=_kernels.resolve_scale(scale, p.dim), mask=mask,
        bias=None if slopes is None else SequenceAlibi(slopes, relative, (1, p.heads, 1, 1)),
        softcap=_kernels.resolve_softcap(softcap), implementation=implementation, return_lse=True)
    if sinks is not None:
        out, lse = add_sinks(xp, out, lse, sinks)
    out = xp.permute_dims(out, (0, 2, 1, 3))
    return (out, lse) if return_lse else out


def _cases(size: str, seed: int) -> list[Case]:
    scale = {"tiny": 1, "small": 4, "medium": 16, "large": 64}[size]
    block_size, heads, kv_heads, dim, value_dim = 4, 4, 2, 8, 6
    lengths = [5 * scale + 2, 0, 4 * scale, 1]  # a partial last page, an empty sequence, a full page, one token
    max_blocks = -(-max(lengths) // block_size) + 1  # one spare table entry per sequence
    num_blocks = 2 * max_blocks * len(lengths)
    host = numpy_namespace()
    order = random.choice((), seed=(seed, 5), population=num_blocks, count=max_blocks * len(lengths), sort=False)
    table = host.reshape(host.astype(order, host.int32), (len(lengths), max_blocks))  # random physical order
    k_cache = random.normal((num_blocks, block_size, kv_heads, dim), seed=(seed, 1))
    v_cache = random.normal((num_blocks, block_size, kv_heads, value_dim), seed=(seed, 2))
    used = {int(table[b, j]) for b, n in enumerate(lengths) for j in range(-(-n // block_size))}
    for block in range(num_blocks):  # NaN in every slot no sequence reads: they must never leak
        for slot in range(block_size):
            if block not in used:
                k_cache[block, slot] = float("nan")
                v_cache[block, slot] = float("nan")
    for b, n in enumerate(lengths):
        if n % block_size:
            last = int(table[b, n // block_size])
            k_cache[last, n % block_size:] = float("nan")
            v_cache[last, n % block_size:] = float("nan")
    seqlens = host.asarray(lengths, dtype=host.int32)
    positional = ("q", "k_cache", "v_cache", "block_table", "cache_seqlens")
    cases = []
    for name, length in (("decode", 1), ("prefill", 3)):
        q = random.normal((len(lengths), length, heads, dim), seed=(seed, 0, length))
        inputs = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": table, "cache_seqlens": seqlens}
        cases.append(Case(name, inputs, {"causal": True}, positional=positional, seed=seed))
    prefill = cases[-1].inputs
    cases += [
        Case("prefill_window_softcap", prefill, {"causal": True, "window": [2, 0], "softcap": 4.0},
             positional=positional, seed=seed),
        Case("sinks_alibi", {**prefill, "sinks": random.normal((heads,), seed=(seed, 3)),
                             "alibi_slopes": random.uniform((heads,), seed=(seed, 4))},
             {"causal": True}, positional=positional, seed=seed),
        Case("not_causal", prefill, {}, positional=positional, seed=seed),
    ]
    return cases


def _reference(q: Any, k_cache: Any, v_cache: Any, block_table: Any, cache_seqlens: Any, /, **params: Any) -> Any:
    """The dense path of :func:`paged_attention`."""
    return paged_attention(q, k_cache, v_cache, block_table, cache_seqlens, **params, implementation="dense")


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    block_size = 16
    blocks = -(-seq // block_size)
    host = numpy_namespace()
    inputs = {
        "q": random.normal((1, 1, heads, dim), seed=(seed, 0)),
        "k_cache": random.normal((blocks, block_size, heads, dim), seed=(seed, 1)),
        "v_cache": random.normal((blocks, block_size, heads, dim), seed=(seed, 2)),
        "block_table": host.reshape(host.arange(blocks, dtype=host.int32), (1, blocks)),
        "cache_seqlens": host.asarray([seq], dtype=host.int32),
    }
    return Case("example", inputs, {"causal": True},
                positional=("q", "k_cache", "v_cache", "block_table", "cache_seqlens"), seed=seed)


def _to_inputs(inputs: dict, params: dict, g: Any) -> dict[str, Any]:
    """Engine gradients back to q ``(B, L, H, D)`` and, through the page gather, to the caches."""
    xp = namespace(g.dq)
    table, seqlens = inputs["block_table"], inputs["cache_seqlens"]
    return {
        "q": xp.permute_dims(g.dq, (0, 2, 1, 3)),
        "k_cache": _pages_adjoint(xp.permute_dims(g.dk, (0, 2, 1, 3)), inputs["k_cache"], table, seqlens),
        "v_cache": _pages_adjoint(xp.permute_dims(g.dv, (0, 2, 1, 3)), inputs["v_cache"], table, seqlens),
    }


_to_inputs.engine_layout = lambda d_out: namespace(d_out).permute_dims(d_out, (0, 2, 1, 3))  # type: ignore[attr-defined]


register(Mechanism(
    key="paged",
    function=paged_attention,
    family="A. core",
    paper="flash-attn flash_attn_with_kvcache (paged KV); Kwon et al. 2023 (vLLM PagedAttention) §4.1",
    params={
        "block_table": "(B, max_blocks) int physical block ids in logical order",
        "cache_seqlens": "(B,) int cached lengths; slots beyond never influence the result",
        "causal": "bool, bottom-right against cache_seqlens",
        "window": "(left, right), -1 or None = unbounded",
        "softcap": "c: c*tanh(s/c) on the scaled scores",
        "sinks": "(H,) logits in the denominator only; lse includes them",
        "alibi_slopes": "(H,): bias -m_h*|r| (flash-attn)",
        "layout": "q (B, L, H, D), caches (num_blocks, block_size, G, D|E) -> out (B, L, H, E), lse (B, H, L)",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    example=_example,
    vjp=sequence_vjp(paged_attention, _to_inputs),
))
