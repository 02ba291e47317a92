"""Segment-level recurrence with a memory of the previous m positions (Transformer-XL style caching)."""

from __future__ import annotations

from typing import Any

from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._patterns import Pattern, causal_pattern, check_positive_int, explicit_mask
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["recurrent_memory_attention"]

IMPLEMENTATIONS = ("auto", "segments", "dense", "tiled")


def segment_memory_pattern(segment_length: int, memory_length: int, offset: int) -> Pattern:
    """Key j allowed for query i iff ``δ + s⌊i/s⌋ − m ≤ j ≤ i + δ`` (δ = ``offset`` = S − L)."""
    s, m = segment_length, memory_length

    def allowed(rows: Any, cols: Any) -> Any:
        return (cols <= rows + offset) & (cols >= offset + (rows // s) * s - m)

    def tile_active(i0: int, i1: int, j0: int, j1: int) -> bool:
        return j0 <= i1 - 1 + offset and j1 - 1 >= offset + (i0 // s) * s - m

    return Pattern(allowed=allowed, tile_active=tile_active)


def _check(segment_length: Any, memory_length: Any) -> tuple[int, int]:
    return (check_positive_int("segment_length", segment_length),
            check_positive_int("memory_length", memory_length, minimum=0))


@typed_options()
def recurrent_memory_attention(q: Any, k: Any, v: Any, /, *, segment_length: int, memory_length: int,
                               scale: float | None = None, return_lse: bool = False, compute_dtype: Any = None,
                               implementation: str = "auto") -> Any:
    """Segment recurrence: segments of s queries attend the previous m cached positions plus themselves (causal).

    .. math::

        o_i = \\mathrm{softmax}_{j \\in W(i)}(\\mathrm{scale}\\; q_i\\cdot k_j)\\, v_j, \\qquad
        W(i) = \\{\\, j : \\delta + s\\lfloor i/s \\rfloor - m \\le j \\le i + \\delta \\,\\}

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` with S ≥ L →
    ``(..., H, L, E)``. The first δ = S − L keys are an initial memory (cached positions before the
    first query); query i sits at key position δ + i.

    Exact equivalence (tested): this equals causal sliding-window attention whose look-back for
    query i is ``m + (i mod s)`` — i.e. :func:`reflex.full_attention` with the mask W(i), bottom-right
    causal — because a segment's memory is exactly the m keys before the segment start and nothing
    is compressed or dropped inside a segment. In a single attention layer the cached memory is the
    previous keys/values themselves (the paper caches the previous layer's hidden states with a stop
    gradient; in a one-layer oracle that is the same keys and values).

    Args:
        segment_length: s ≥ 1 queries per segment.
        memory_length: m ≥ 0 cached positions before each segment (m = 0: block-causal segments).
        implementation: ``"auto"``/``"segments"`` processes the sequence segment by segment, each
            against at most m + s keys (memory O(L·(s + m)) in total, O(s·(s + m)) scores at a time,
            as the recurrence runs); ``"dense"``/``"tiled"`` run the whole sequence through the
            engine with the pattern W (the independent path).
        scale, return_lse, compute_dtype: as :func:`reflex.full_attention`.

    References: Dai et al. 2019, "Transformer-XL", ACL, §3.2 (segment-level recurrence with state
    reuse); catalogue seed "memory and recurrence".
    """
    s, m = _check(segment_length, memory_length)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}")
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    if p.key_length < p.length:
        raise ValueError(f"k has {p.key_length} positions; q has {p.length}: keys must cover the queries (S >= L)")
    scale = _kernels.resolve_scale(scale, p.dim)
    offset = p.key_length - p.length
    if implementation in ("dense", "tiled"):
        pattern = segment_memory_pattern(s, m, offset)
        return _kernels.softmax_attention(p, scale=scale, mask=pattern.allowed, tile_active=pattern.tile_active,
                                          implementation=implementation, return_lse=return_lse)
    xp = p.xp
    if p.length == 0:
        out, lse = _kernels.empty_result(p)
        return (out, lse) if return_lse else out
    outs, lses = [], []
    for start in range(0, p.length, s):
        stop = min(start + s, p.length)
        first = max(0, offset + start - m)  # the segment's memory starts m keys before it
        last = offset + stop  # ... and its keys end with its own last position
        segment = _kernels.prepare(p.q[..., start:stop, :], p.k[..., first:last, :], p.v[..., first:last, :],
                                   compute_dtype=p.q.dtype)
        causal = causal_pattern("bottom_right", segment.length, segment.key_length)
        out, lse = _kernels.dense(segment, scale=scale, mask=causal.allowed)
        outs.append(out)
        lses.append(lse)
    out = xp.concat(outs, axis=-2)
    return (out, xp.concat(lses, axis=-1)) if return_lse else out


def _pattern(q: Any, k: Any, v: Any, /, *, segment_length: int, memory_length: int, **_: Any) -> Any:
    """The boolean ``(..., H, L, S)`` mask W of attended keys."""
    p = _kernels.prepare(q, k, v)
    allowed = segment_memory_pattern(segment_length, memory_length, p.key_length - p.length).allowed
    return explicit_mask(p.xp, p.device, p.score_shape, allowed)


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """The whole sequence through the dense engine with the pattern W."""
    return recurrent_memory_attention(q, k, v, **params, implementation="dense")


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(heads=d["H"], kv_heads=d["G"], dim=d["D"], value_dim=d["E"])
    selfattn = qkv(seed, length=d["L"] * 2 + 1, key_length=d["L"] * 2 + 1, **shapes)
    cached = qkv(seed, length=d["L"], key_length=d["S"], **shapes)
    return [
        Case("self", selfattn, {"segment_length": max(2, d["L"] // 2), "memory_length": max(1, d["L"] // 2)}, seed=seed),
        Case("initial_memory", cached, {"segment_length": 3, "memory_length": 2}, seed=seed),
        Case("no_memory", selfattn, {"segment_length": 3, "memory_length": 0}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    """Four segments: s = m = min(512, ⌈seq/4⌉)."""
    s = min(512, -(-seq // 4))
    return Case("example", example_qkv(seq, heads, dim, seed), {"segment_length": s, "memory_length": s}, seed=seed)


register(Mechanism(
    key="recurrent_memory",
    function=recurrent_memory_attention,
    family="I. memory, recurrence, hierarchy, routing",
    paper="Dai et al. 2019 (Transformer-XL), ACL, §3.2",
    params={
        "segment_length": "s: queries per segment",
        "memory_length": "m: cached positions before each segment",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    pattern=_pattern,
    example=_example,
    vjp=_kernels.engine_vjp(recurrent_memory_attention),
))
