"""BP-Transformer attention: tokens attend k neighbours per level of a binary partition tree (Ye et al. 2019)."""

from __future__ import annotations

from typing import Any

from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, standard
from reflex.mechanisms._patterns import (Pattern, causal_offset, check_alignment, check_positive_int, explicit_mask,
                                         lookup_flags)
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["bp_tree_attention"]

BP_IMPLEMENTATIONS = ("auto", "dense", "tiled", "gather")


# --- the tree ------------------------------------------------------------------------------------

def tree_levels(key_length: int) -> int:
    """Λ = ⌈log₂ S⌉: the root's level (0 when S ≤ 1, where the single token is the root)."""
    levels = 0
    while (1 << levels) < key_length:
        levels += 1
    return levels


def level_sizes(key_length: int) -> list[int]:
    """Node counts ``⌈S / 2^ℓ⌉`` of levels ℓ = 0 (tokens) … Λ (root)."""
    return [-(-key_length // (1 << level)) for level in range(tree_levels(key_length) + 1)] if key_length else [0]


def node_means(xp: Any, device: Any, x: Any, key_length: int) -> Any:
    """``[x; means of the level-1 … Λ spans]`` along axis −2: ``(..., S, ·)`` → ``(..., S_ext, ·)``.

    Span sums are built pairwise up the tree (level ℓ = left child + right child of level ℓ − 1; an
    odd level's last node has no right child and is carried as is), then divided by the span's
    token count ``min((t+1)·2^ℓ, S) − t·2^ℓ``: the same additions on every backend.
    """
    parts, sums = [x], x
    for level, size in enumerate(level_sizes(key_length)[1:], start=1):
        if sums.shape[-2] % 2:
            pad = xp.zeros((*sums.shape[:-2], 1, sums.shape[-1]), dtype=sums.dtype, device=device)
            sums = xp.concat([sums, pad], axis=-2)
        sums = sums[..., 0::2, :] + sums[..., 1::2, :]
        start = xp.arange(size, dtype=xp.int64, device=device) * (1 << level)
        counts = xp.minimum(start + (1 << level), key_length) - start
        parts.append(sums / xp.reshape(xp.astype(counts, sums.dtype), (size, 1)))
    return xp.concat(parts, axis=-2) if len(parts) > 1 else x


def _ceil_div(x: Any, d: Any) -> Any:
    return -((-x) // d)


def bp_tree_pattern(xp: Any, device: Any, key_length: int, neighbours: int, causal: bool, include_self: bool,
                    offset: int) -> Pattern:
    """Query i (at token position a = i + δ) attends extended key c = node (ℓ, t) iff it is in A(a).

    The frontiers of the covered interval have closed forms (unrolling the per-level recursion):
    left ``A_0 = a``, ``A_ℓ = 2^{ℓ−1}·max(⌈(a+k)/2^{ℓ−1}⌉ − 2k, 0)``; right ``B_0 = a + 1``,
    ``B_ℓ = 2^{ℓ−1}·(⌊(a+1−k)/2^{ℓ−1}⌋ + 2k)`` (ℓ ≥ 1). Level-ℓ node t is a *main* left node iff
    ``⌈A_ℓ/2^ℓ⌉ − k ≤ t`` and ``(t+1)·2^ℓ ≤ A_ℓ``; a main right node iff ``t·2^ℓ ≥ B_ℓ`` and
    ``t ≤ ⌊B_ℓ/2^ℓ⌋ + k − 1``. When ``A_{ℓ+1}/2^ℓ`` is odd the level-ℓ node just left of ``A_{ℓ+1}``
    stands in for the level-(ℓ+1) node that would overlap the covered interval; likewise on the right.
    """
    k = neighbours
    sizes = level_sizes(key_length)
    levels = xp.concat([xp.full((n,), m, dtype=xp.int64, device=device) for m, n in enumerate(sizes)])
    index = xp.concat([xp.arange(n, dtype=xp.int64, device=device) for n in sizes])
    spans = xp.concat([xp.full((n,), 1 << m, dtype=xp.int64, device=device) for m, n in enumerate(sizes)])

    def allowed(rows: Any, cols: Any) -> Any:
        a = rows + offset
        m, t, span = (lookup_flags(xp, table, cols) for table in (levels, index, spans))  # ℓ, t, 2^ℓ
        half = xp.where(m == 0, 1, span // 2)
        frontier = xp.where(m == 0, a, half * xp.maximum(_ceil_div(a + k, half) - 2 * k, 0))
        ok = (t >= _ceil_div(frontier, span) - k) & ((t + 1) * span <= frontier)
        stand_in = xp.maximum(_ceil_div(a + k, span) - 2 * k, 0)  # A_{ℓ+1} / 2^ℓ
        ok = ok | (stand_in % 2 == 1) & (t == stand_in - 1) & (k >= 1)
        if not causal:
            frontier = xp.where(m == 0, a + 1, half * ((a + 1 - k) // half + 2 * k))
            ok = ok | (t * span >= frontier) & (t <= frontier // span + k - 1)
            stand_in = (a + 1 - k) // span + 2 * k  # B_{ℓ+1} / 2^ℓ
            ok = ok | (stand_in % 2 == 1) & (t == stand_in) & (k >= 1)
        if include_self:
            ok = ok | (m == 0) & (t == a)
        return ok & (a >= 0) & (a < key_length)

    def tile_active(i0: int, i1: int, j0: int, j1: int) -> bool:
        if j1 > key_length:  # span nodes: any query may reach them
            return True
        reach = k + 1  # tokens are within a ± (k + 1) (the level-0 stand-ins)
        return j1 - 1 >= i0 + offset - reach and j0 <= i1 - 1 + offset + (0 if causal else reach)

    return Pattern(allowed=allowed, tile_active=tile_active)


def bp_tree_indices(xp: Any, device: Any, length: int, key_length: int, neighbours: int, causal: bool,
                    include_self: bool, offset: int) -> Any:
    """Each query's attended extended keys as a list ``(L, K)`` for the gather kernel (−1 = padding).

    Slots: self; per level ℓ = 0 … Λ, k main nodes per side and one stand-in node per side from level
    ℓ + 1. K = 1 + (2k + 2)(Λ + 1) (right slots only when not causal). No key is listed twice.
    """
    k = neighbours
    sizes = level_sizes(key_length)
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    a = xp.reshape(xp.arange(length, dtype=xp.int64, device=device) + offset, (length, 1))
    valid = (a >= 0) & (a < key_length)
    steps = xp.reshape(xp.arange(k, dtype=xp.int64, device=device), (1, k))
    slots = []

    def place(level: int, t: Any, keep: Any) -> None:
        keep = keep & valid & (t >= 0) & (t < sizes[level])
        slots.append(xp.where(keep, starts[level] + t, -1))

    if include_self:
        place(0, a, a == a)
    for level, _ in enumerate(sizes):
        span, half = 1 << level, 1 << max(level - 1, 0)
        left = a if level == 0 else half * xp.maximum(_ceil_div(a + k, half) - 2 * k, 0)
        t = _ceil_div(left, span) - k + steps
        place(level, t, (t + 1) * span <= left)
        stand_in = xp.maximum(_ceil_div(a + k, span) - 2 * k, 0)
        place(level, stand_in - 1, (stand_in % 2 == 1) & (k >= 1))
        if not causal:
            right = a + 1 if level == 0 else half * ((a + 1 - k) // half + 2 * k)
            t = right // span + steps
            place(level, t, t * span >= right)
            stand_in = (a + 1 - k) // span + 2 * k
            place(level, stand_in, (stand_in % 2 == 1) & (k >= 1))
    slots = [xp.broadcast_to(s, (length, int(s.shape[-1]))) for s in slots]
    return xp.concat(slots, axis=-1) if slots else xp.full((length, 0), -1, dtype=xp.int64, device=device)


# --- the mechanism -------------------------------------------------------------------------------

def _check(neighbours: Any, causal: Any, include_self: Any, alignment: Any, implementation: Any
           ) -> tuple[int, bool, bool, str, str]:
    neighbours = check_positive_int("neighbours", neighbours, minimum=0)
    for name, flag in (("causal", causal), ("include_self", include_self)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False; got {flag!r}")
    if implementation not in BP_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(BP_IMPLEMENTATIONS)}; got {implementation!r}")
    return neighbours, causal, include_self, check_alignment(alignment), implementation


def _extended(q: Any, k: Any, v: Any, compute_dtype: Any) -> _kernels.Prepared:
    """q with the extended keys/values ``[tokens; span means]`` prepared for the engine."""
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp, n = p.xp, p.key_length
    return _kernels.prepare(p.q, node_means(xp, p.device, p.k, n), node_means(xp, p.device, p.v, n),
                            compute_dtype=p.q.dtype)


@typed_options()
def bp_tree_attention(q: Any, k: Any, v: Any, /, *, neighbours: int, causal: bool = False, include_self: bool = True,
                      alignment: str = "top_left", scale: float | None = None, return_lse: bool = False,
                      compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """BP-Transformer attention: k neighbours per level of a binary partition tree of span means.

    .. math::

        O_i = \\mathrm{softmax}_{c \\in A(a_i)}(\\mathrm{scale}\\; q_i \\cdot \\bar k_c)\\, \\bar v_c, \\qquad
        \\bar k_{(\\ell, t)} = \\frac{1}{|P_{\\ell t}|} \\sum_{j \\in P_{\\ell t}} k_j, \\quad
        P_{\\ell t} = [t 2^\\ell, \\min((t+1) 2^\\ell, S))

    **Tree.** Level ℓ = 0 … Λ = ⌈log₂ S⌉ partitions the key positions into aligned spans
    ``P_{ℓt}`` of 2^ℓ tokens (t = 0 … ⌈S/2^ℓ⌉ − 1); when S is not a power of two the last span of a
    level is partial (it holds fewer tokens, and its node is the mean of those). Level 0 are the
    tokens, level Λ the root. A span node's key and value are the means of its tokens' keys and
    values (for affine projections, exactly the projection of the mean hidden state).

    **Extended key set** (length ``S_ext = Σ_ℓ ⌈S/2^ℓ⌉``): the S tokens, then the level-1 nodes in
    order of t, then level 2, …, the root last. ``reflex.get("bp_tree").pattern`` returns the
    boolean ``(..., H, L, S_ext)`` mask over this set; the output equals ``full_attention`` on the
    concatenated keys/values with that mask.

    **Attended set A(a)** of the query at token position ``a_i = i + δ`` (the paper's contextual
    edges, fine to coarse, and the self-loop): level 0 — the k nearest tokens on each side; level
    ℓ ≥ 1 — the k nearest level-ℓ spans on each side beyond the interval covered so far. When the
    covered interval ends in the middle of a level-ℓ span (it is then aligned to 2^{ℓ−1}), that
    span's uncovered child (level ℓ − 1) is taken in its place and counts as one of the k. Spans and
    tokens outside ``[0, S)`` do not exist. For k ≥ 1 the attended tokens and spans partition
    ``[0, S)`` exactly (``[0, a]`` when causal): every position is covered once, at a resolution
    that coarsens with distance, with O(k log(S/k)) keys per query.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``out (..., H, L, E)``;
    GQA by head groups.

    Args:
        neighbours: k ≥ 0, nodes per side per level (the paper's k; its ``step``). 0 attends self
            only; k ≥ S − 1 attends every token (plain attention; no span node is needed).
        causal: one-directional (the paper's decoder / language model): drop every node to the
            right, so the left nodes and self partition ``[0, a]``.
        include_self: attend the query's own token (the paper's self-loop; default True).
        alignment: ``"top_left"`` (δ = 0) or ``"bottom_right"`` (δ = S − L) for L ≠ S; a query
            whose position lies outside ``[0, S)`` attends nothing (0 and lse −∞).
        scale, return_lse, compute_dtype: as :func:`full_attention` (scores use the extended keys).
        implementation: ``"dense"``/``"tiled"`` (engine with the mask over the extended keys),
            ``"gather"`` (per-query lists of O(k log S) extended keys), ``"auto"`` (dense while
            L·S_ext ≤ 2²⁴, else gather).

    Not reproduced from the paper: span nodes there are graph nodes with their own hidden states,
    updated layer by layer by attending their tokens (affiliated edges), and edges carry learned
    relative-position embeddings per (level, offset); here one call is one token-side attention
    with span nodes fixed to token means, and biases are left to the caller. The official graph
    builder (``graph_builder/builder.pyx``, ``BinaryPartition``) tests a right stand-in's parent
    rather than the stand-in itself, so for S not a power of two it can attend a left span twice;
    here a node exists iff its first token is ``< S``.

    Reference: Ye, Guo, Gan, Qiu, Zhang 2019, "BP-Transformer: Modelling Long-Range Context via
    Binary Partitioning", arXiv:1911.04070, §3 (binary partitioning; contextual edges with k
    neighbours per level; graph self-attention).
    """
    neighbours, causal, include_self, alignment, implementation = _check(neighbours, causal, include_self, alignment,
                                                                          implementation)
    p = _extended(q, k, v, compute_dtype)
    xp, key_length = p.xp, int(k.shape[-2])
    offset = causal_offset(alignment, p.length, key_length)
    scale = _kernels.resolve_scale(scale, p.dim)
    if implementation == "auto":
        implementation = "dense" if p.length * p.key_length <= _kernels.AUTO_TILED_ELEMENTS else "gather"
    if implementation == "gather" and key_length > 0:
        indices = bp_tree_indices(xp, p.device, p.length, key_length, neighbours, causal, include_self, offset)
        out, lse = _kernels.gather(p, indices, scale=scale)
        return (out, lse) if return_lse else out
    pattern = bp_tree_pattern(xp, p.device, key_length, neighbours, causal, include_self, offset)
    return _kernels.softmax_attention(p, scale=scale, mask=pattern.allowed, tile_active=pattern.tile_active,
                                      implementation="dense" if implementation == "gather" else implementation,
                                      return_lse=return_lse)

def node_means_vjp(xp: Any, device: Any, d_ext: Any, key_length: int) -> Any:
    """The adjoint of :func:`node_means`: ``d_ext (..., S_ext, ·)`` → ``dx (..., S, ·)``.

    Token j receives its own row plus, at every level ℓ ≥ 1, its span's row divided by the span's
    token count: ``dx_j = d_j + Σ_ℓ d_{ℓ, ⌊j/2^ℓ⌋} / n_{ℓ, ⌊j/2^ℓ⌋}``.
    """
    sizes = level_sizes(key_length)
    dx = d_ext[..., :key_length, :]
    start = key_length
    tokens = xp.arange(key_length, dtype=xp.int64, device=device)
    for level, size in enumerate(sizes[1:], start=1):
        first = xp.arange(size, dtype=xp.int64, device=device) * (1 << level)
        counts = xp.minimum(first + (1 << level), key_length) - first
        per_node = d_ext[..., start:start + size, :] / xp.reshape(xp.astype(counts, d_ext.dtype), (size, 1))
        dx = dx + xp.take(per_node, tokens // (1 << level), axis=per_node.ndim - 2)
        start += size
    return dx


def _vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, **params: Any) -> dict:
    """VJP of :func:`bp_tree_attention` through the engine's backward.

    The forward is one engine call over the extended keys and values ``[tokens; span means]``
    (linear in k, v): ``dq`` is the call's, and ``dk``, ``dv`` are the call's gradients of the extended
    keys and values taken back through :func:`node_means_vjp`. The tree pattern is a constant mask.
    """
    result, calls = _kernels.run_recorded(bp_tree_attention, inputs, params, return_lse=d_lse is not None)
    (call,) = calls
    p = call.p
    g = call.backward(d_out, d_lse)
    n = int(inputs["k"].shape[-2])
    return {"q": g.dq, "k": node_means_vjp(p.xp, p.device, g.dk, n), "v": node_means_vjp(p.xp, p.device, g.dv, n)}



def _pattern(q: Any, k: Any, v: Any, /, *, neighbours: int, causal: bool = False, include_self: bool = True,
             alignment: str = "top_left", **_: Any) -> Any:
    """The boolean ``(..., H, L, S_ext)`` mask over the extended key set ``[tokens; level-1 … root spans]``."""
    neighbours, causal, include_self, alignment, _impl = _check(neighbours, causal, include_self, alignment, "auto")
    p = _kernels.prepare(q, k, v)
    key_length = p.key_length
    pattern = bp_tree_pattern(p.xp, p.device, key_length, neighbours, causal, include_self,
                              causal_offset(alignment, p.length, key_length))
    shape = (*p.batch, p.heads, p.length, sum(level_sizes(key_length)))
    return explicit_mask(p.xp, p.device, shape, pattern.allowed)


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    _, square = standard(size, seed, length=d["S"])  # S = 1.5 L + 1: not a power of two
    return [
        Case("k1", square, {"neighbours": 1}, seed=seed),
        Case("k2_causal", square, {"neighbours": 2, "causal": True}, seed=seed),
        Case("bottom_right_gather", gqa, {"neighbours": 1, "alignment": "bottom_right", "implementation": "gather"},
             seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", example_qkv(seq, heads, dim, seed), {"neighbours": 2}, seed=seed)


register(Mechanism(
    key="bp_tree",
    function=bp_tree_attention,
    family="B. position-sparse",
    paper="Ye et al. 2019 §3 (BP-Transformer, arXiv:1911.04070)",
    params={
        "neighbours": "k >= 0: nodes per side per level of the binary partition tree",
        "causal": "drop right-side nodes (one-directional)",
        "include_self": "attend the query's own token (default True)",
        "alignment": "'top_left' | 'bottom_right' (query i at token i + S - L)",
        "implementation": "'auto' | 'dense' | 'tiled' | 'gather'",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    pattern=_pattern,
    vjp=_vjp,
))
