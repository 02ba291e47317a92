"""Variable-length (packed) attention: flash-attn's ``flash_attn_varlen_func`` layout on the engine."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace, numpy_namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._merge import add_sinks
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._patterns import check_alignment
from reflex.mechanisms._sequences import (SequenceAlibi, check_sinks, check_slopes, host_ints, sequence_vjp,
                                          visible, window_sides)
from reflex.registry import Case, Mechanism, register

__all__ = ["varlen_attention"]


def _check_cu_seqlens(name: str, cu: Any, total: int, xp: Any, device: Any) -> list[int]:
    """``cu_seqlens`` as host ints: 1-D int, starts at 0, non-decreasing, ends at the token count."""
    if not xp.isdtype(cu.dtype, "integral"):
        raise TypeError(f"{name} must be an integer array (int32 prefix sums); got dtype {cu.dtype}")
    if cu.ndim != 1 or int(cu.shape[0]) < 1:
        raise ValueError(f"{name} must have shape (batch + 1,); got {tuple(cu.shape)}")
    if device_of(cu) != device:
        raise ValueError(f"{name} is on device {device_of(cu)}; q is on {device}")
    values = host_ints(cu)
    if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])) or values[-1] != total:
        raise ValueError(f"{name} must be non-decreasing prefix sums from 0 to {total} (the packed token count); "
                         f"got {values[:8]}{' ...' if len(values) > 8 else ''}")
    return values


def _segments(values: list[int], xp: Any, device: Any) -> tuple[Any, Any]:
    """Per token: its sequence id and the start of its sequence (int64 arrays of the token count)."""
    total = values[-1]
    ids, starts = [], []
    for b, (a, z) in enumerate(zip(values, values[1:])):
        ids += [b] * (z - a)
        starts += [a] * (z - a)
    return (xp.asarray(ids, dtype=xp.int64, device=device) if total else xp.zeros((0,), dtype=xp.int64, device=device),
            xp.asarray(starts, dtype=xp.int64, device=device) if total else xp.zeros((0,), dtype=xp.int64, device=device))


@typed_options(engine_options=False)  # flash-attn's own packed/paged layout
def varlen_attention(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, /, *, causal: bool = False,
                     alignment: str = "bottom_right", window: Any = (-1, -1), softcap: float | None = None,
                     sinks: Any = None, alibi_slopes: Any = None, scale: float | None = None,
                     return_lse: bool = False, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Packed variable-length attention (flash-attn ``flash_attn_varlen_func``): no token sees another sequence.

    .. math::

        O_i = \\mathrm{softmax}_{j \\in b(i),\\, \\mathrm{visible}(r_{ij})}\\big(\\mathrm{cap}(\\mathrm{scale}\\,
        q_i\\cdot k_j) - m_h |r_{ij}|\\big) v_j, \\qquad r_{ij} = (j - c^k_b) - (i - c^q_b) - \\delta_b

    Layout (flash-attn's packed one, **not** reflex's usual ``(..., H, L, D)``): ``q (T_q, H, D)``,
    ``k (T_k, G, D)``, ``v (T_k, G, E)`` with the tokens of all sequences concatenated;
    ``cu_seqlens_q (B + 1,)``, ``cu_seqlens_k (B + 1,)`` integer prefix sums from 0 (sequence b owns
    query tokens ``c^q_b … c^q_{b+1} − 1``). Returns ``out (T_q, H, E)`` and, with ``return_lse``,
    ``lse (H, T_q)`` (natural log; −∞ for a token that sees no key, which outputs 0).

    Args:
        causal: key j visible iff ``r ≤ 0``; ``alignment`` says where: ``"bottom_right"``
            (δ_b = S_b − L_b, flash-attn: the last query of a sequence sees all its keys) or
            ``"top_left"`` (δ_b = 0, FlexAttention document masking).
        window: ``(left, right)``, visible iff ``−left ≤ r ≤ right``; −1 or ``None`` = unbounded.
        softcap: ``c·tanh(s/c)`` on the scaled scores, before ALiBi.
        sinks: per-head logits ``(H,)`` in each row's denominator only (no value); the lse includes
            them; a row with no key outputs 0 and lse = s_h (gpt-oss; FlashAttention-4).
        alibi_slopes: ``(H,)``, adds ``−m_h·|r|`` (flash-attn's convention).
        scale: default 1/√D. GQA: query head h reads kv head ``h // (H/G)``.

    Zero-length sequences (equal consecutive offsets) are allowed. Equals a loop of
    :func:`reflex.full_attention` / :func:`reflex.sliding_window_attention` over the sequences.
    Raises ``ValueError`` for offsets that do not start at 0, decrease, do not end at the token
    count, or differ in batch count between q and k.

    Gradients (:func:`reflex.vjp`): q, k, v, sinks and alibi_slopes, through the engine's backward.

    Source: flash-attn ``flash_attn_varlen_func`` (Dao 2023, FlashAttention-2 §3.3, varlen API);
    FlexAttention document masking (attention-gym).
    """
    xp = namespace(q, k, v, cu_seqlens_q, cu_seqlens_k)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            raise ValueError(f"{name} must have the packed shape (tokens, heads, dim); got {tuple(x.shape)}")
    p = _kernels.prepare(*(xp.permute_dims(x, (1, 0, 2)) for x in (q, k, v)), compute_dtype=compute_dtype)
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, p.length, xp, p.device)
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, p.key_length, xp, p.device)
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q describes {len(cu_q) - 1} sequences; cu_seqlens_k {len(cu_k) - 1}")
    left, right = window_sides(window, causal)
    bottom_right = check_alignment(alignment) == "bottom_right"
    sinks = check_sinks(sinks, p.heads, xp, p.device, p.q.dtype)
    slopes = check_slopes(alibi_slopes, p.heads, xp, p.device, p.q.dtype)
    seq_q, start_q = _segments(cu_q, xp, p.device)
    seq_k, start_k = _segments(cu_k, xp, p.device)
    lengths_q = xp.asarray([b - a for a, b in zip(cu_q, cu_q[1:])] or [0], dtype=xp.int64, device=p.device)
    lengths_k = xp.asarray([b - a for a, b in zip(cu_k, cu_k[1:])] or [0], dtype=xp.int64, device=p.device)

    def relative(rows: Any, cols: Any) -> tuple[Any, Any]:
        rows, cols = xp.reshape(rows, (-1,)), xp.reshape(cols, (-1,))
        bq, bk = xp.take(seq_q, rows), xp.take(seq_k, cols)
        i_local = xp.reshape(rows - xp.take(start_q, rows), (-1, 1))
        j_local = xp.reshape(cols - xp.take(start_k, cols), (1, -1))
        delta = xp.take(lengths_k, bq) - xp.take(lengths_q, bq) if bottom_right else xp.zeros_like(bq)
        rel = j_local - i_local - xp.reshape(delta, (-1, 1))
        return rel, xp.reshape(bq, (-1, 1)) == xp.reshape(bk, (1, -1))

    def mask(rows: Any, cols: Any) -> Any:
        rel, same = relative(rows, cols)
        return same & visible(rel, left, right)

    def tile_active(i0: int, i1: int, j0: int, j1: int) -> bool:  # sequences overlap (block diagonal)
        first_q, last_q = _sequence_of(cu_q, i0), _sequence_of(cu_q, i1 - 1)
        first_k, last_k = _sequence_of(cu_k, j0), _sequence_of(cu_k, j1 - 1)
        return first_q <= last_k and first_k <= last_q

    out, lse = _kernels.softmax_attention(
        p, scale=_kernels.resolve_scale(scale, p.dim), mask=mask,
        bias=None if slopes is None else SequenceAlibi(slopes, lambda r, c: relative(r, c)[0], (p.heads, 1, 1)),
        softcap=_kernels.resolve_softcap(softcap), tile_active=tile_active, implementation=implementation,
        return_lse=True)
    if sinks is not None:
        out, lse = add_sinks(xp, out, lse, sinks)
    out = xp.permute_dims(out, (1, 0, 2))
    return (out, lse) if return_lse else out


def _sequence_of(cu: list[int], token: int) -> int:
    """The sequence that owns packed token ``token`` (the last b with c_b ≤ token < c_{b+1})."""
    lo, hi = 0, len(cu) - 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cu[mid] <= token:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _host_int32(values: list[int]) -> Any:
    host = numpy_namespace()
    return host.asarray(values, dtype=host.int32)


def _cases(size: str, seed: int) -> list[Case]:
    scale = {"tiny": 1, "small": 3, "medium": 8, "large": 24}[size]
    lengths_q = [3 * scale, 0, 1, 5 * scale]  # a zero-length sequence and a single token
    lengths_k = [4 * scale, 2, 0, 5 * scale + 2]  # a query sequence with no key (outputs 0)
    cu_q = [0]
    cu_k = [0]
    for a, b in zip(lengths_q, lengths_k):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    heads, kv_heads, dim, value_dim = 4, 2, 8, 6
    inputs = {
        "q": random.normal((cu_q[-1], heads, dim), seed=(seed, 0)),
        "k": random.normal((cu_k[-1], kv_heads, dim), seed=(seed, 1)),
        "v": random.normal((cu_k[-1], kv_heads, value_dim), seed=(seed, 2)),
        "cu_seqlens_q": _host_int32(cu_q),
        "cu_seqlens_k": _host_int32(cu_k),
    }
    positional = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")
    sinks = random.normal((heads,), seed=(seed, 3))
    slopes = random.uniform((heads,), seed=(seed, 4))
    return [
        Case("packed", inputs, {}, positional=positional, seed=seed),
        Case("causal", inputs, {"causal": True}, positional=positional, seed=seed),
        Case("causal_top_left", inputs, {"causal": True, "alignment": "top_left"}, positional=positional, seed=seed),
        Case("window", inputs, {"window": [2, 1]}, positional=positional, seed=seed),
        Case("causal_window_softcap", inputs, {"causal": True, "window": [3, -1], "softcap": 5.0},
             positional=positional, seed=seed),
        Case("sinks_alibi", {**inputs, "sinks": sinks, "alibi_slopes": slopes}, {"causal": True},
             positional=positional, seed=seed),
    ]


def _reference(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, /, **params: Any) -> Any:
    """The dense path of :func:`varlen_attention` (one score matrix over all packed tokens)."""
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **params, implementation="dense")


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    half = seq // 2
    cu = _host_int32([0, half, seq])
    inputs = {"q": random.normal((seq, heads, dim), seed=(seed, 0)), "k": random.normal((seq, heads, dim), seed=(seed, 1)),
              "v": random.normal((seq, heads, dim), seed=(seed, 2)), "cu_seqlens_q": cu, "cu_seqlens_k": cu}
    return Case("example", inputs, {"causal": True}, positional=("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"),
                seed=seed)


def _to_inputs(inputs: dict, params: dict, g: Any) -> dict[str, Any]:
    """Engine gradients ``(H, T, ·)`` back to the packed ``(T, H, ·)`` layout."""
    xp = namespace(g.dq)
    return {name: xp.permute_dims(grad, (1, 0, 2)) for name, grad in (("q", g.dq), ("k", g.dk), ("v", g.dv))}


_to_inputs.engine_layout = lambda d_out: namespace(d_out).permute_dims(d_out, (1, 0, 2))  # type: ignore[attr-defined]


register(Mechanism(
    key="varlen",
    function=varlen_attention,
    family="A. core",
    paper="flash-attn flash_attn_varlen_func (Dao 2023, FlashAttention-2); FlexAttention document masking",
    params={
        "cu_seqlens_q, cu_seqlens_k": "(B+1,) int prefix sums from 0; zero-length sequences allowed",
        "causal": "bool; aligned per sequence by alignment",
        "alignment": "'bottom_right' (flash-attn, default) | 'top_left' (FlexAttention document mask)",
        "window": "(left, right), -1 or None = unbounded; relative to the aligned diagonal",
        "softcap": "c: c*tanh(s/c) on the scaled scores",
        "sinks": "(H,) logits in the denominator only; lse includes them",
        "alibi_slopes": "(H,): bias -m_h*|r| (flash-attn)",
        "layout": "q (T_q, H, D), k (T_k, G, D), v (T_k, G, E) -> out (T_q, H, E), lse (H, T_q)",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    example=_example,
    vjp=sequence_vjp(varlen_attention, _to_inputs),
))
