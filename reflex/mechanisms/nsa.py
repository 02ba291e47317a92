"""Native Sparse Attention (Yuan et al. 2025): compressed, selected and sliding branches, gated."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, qkv
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._patterns import band_pattern, check_positive_int, top_indices
from reflex.registry import Case, Mechanism, register

__all__ = ["nsa_attention", "nsa_block_indices"]


def _pool_blocks(xp: Any, x: Any, block_size: int, device: Any) -> Any:
    """Means of consecutive blocks of ``block_size`` positions ``(..., G, S, ·)`` → ``(..., G, C, ·)``,
    C = ⌈S / block_size⌉; a partial last block is the mean of the positions it has."""
    length = int(x.shape[-2])
    blocks = -(-length // block_size)
    full = length // block_size
    parts = []
    if full:
        head = x[..., :full * block_size, :]
        parts.append(xp.mean(xp.reshape(head, (*x.shape[:-2], full, block_size, int(x.shape[-1]))), axis=-2))
    if blocks > full:
        parts.append(xp.mean(x[..., full * block_size:, :], axis=-2, keepdims=True))
    if not parts:
        return xp.zeros((*x.shape[:-2], 0, int(x.shape[-1])), dtype=x.dtype, device=device)
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=-2)


def _visible(block_size: int, offset: int) -> Any:
    """Compressed block c is visible to query i (token t = i + δ) iff its last token is not later: (c+1)·bs − 1 ≤ t."""
    return lambda rows, cols: (cols + 1) * block_size - 1 <= rows + offset


def _compressed(p: Any, block_size: int, scale: float, offset: int) -> tuple[Any, Any]:
    """The compressed branch's prepared inputs (mean-pooled k, v) and its visibility term."""
    xp = p.xp
    k_cmp = _pool_blocks(xp, p.k, block_size, p.device)
    v_cmp = _pool_blocks(xp, p.v, block_size, p.device)
    return _kernels.prepare(p.q, k_cmp, v_cmp, compute_dtype=p.q.dtype), _visible(block_size, offset)


def _select(p: Any, block_size: int, block_counts: int, scale: float, offset: int) -> Any:
    """Top-``block_counts`` block indices ``(..., G, L, n)`` from the compressed maps (see :func:`nsa_block_indices`)."""
    xp = p.xp
    pc, visible = _compressed(p, block_size, scale, offset)
    blocks = pc.key_length
    probs = _kernels.weights(pc, scale=scale, mask=visible)  # (..., H, L, C); no visible block → row of 0
    group_mean = xp.mean(xp.reshape(probs, (*p.batch, p.kv_heads, p.group, p.length, blocks)), axis=-3)
    rows = xp.reshape(xp.arange(p.length, dtype=xp.int64, device=p.device), (p.length, 1)) + offset
    cols = xp.reshape(xp.arange(blocks, dtype=xp.int64, device=p.device), (1, blocks))
    current = rows // block_size
    forced = (cols == current) | (cols == 0) | (cols == current - 1)
    allowed = visible(rows - offset, cols) | forced
    scores = xp.where(forced, 1.0, group_mean)  # forced blocks outrank every probability
    scores = xp.where(allowed, scores, -math.inf)  # never pick an invisible block: slot −1
    chosen = top_indices(xp, scores, block_counts)
    if int(chosen.shape[-1]) < block_counts:  # fewer blocks than slots: pad with −1
        pad = xp.full((*chosen.shape[:-1], block_counts - int(chosen.shape[-1])), -1, dtype=xp.int64, device=p.device)
        chosen = xp.concat([chosen, pad], axis=-1)
    return chosen


def _check_gate(p: Any, name: str, gate: Any) -> Any:
    if gate is None:
        return None
    gate = _kernels.check_array(p.xp, p.device, p.q.dtype, name, gate)
    target = (*p.batch, p.heads, p.length)
    if tuple(gate.shape) != target:
        raise ValueError(f"{name} must have shape (..., H, L) = {target}; got {tuple(gate.shape)}")
    return gate


def _check_block_indices(p: Any, block_indices: Any, blocks: int) -> Any:
    xp = p.xp
    if namespace(block_indices) is not xp:
        raise TypeError("block_indices comes from a different array library than q")
    if not xp.isdtype(block_indices.dtype, "integral"):
        raise TypeError(f"block_indices must be an integer array of block numbers; got dtype {block_indices.dtype}")
    shape = tuple(int(n) for n in block_indices.shape)
    if len(shape) != len(p.batch) + 3 or shape[:-1] != (*p.batch, p.kv_heads, p.length):
        raise ValueError(f"block_indices must have shape (..., G, L, n) with (..., G, L) = "
                         f"{(*p.batch, p.kv_heads, p.length)}; got {shape}")
    if shape[-1] and (int(xp.min(block_indices)) < -1 or int(xp.max(block_indices)) >= blocks):
        raise ValueError(f"block_indices must lie in [-1, {blocks}) (-1 = empty slot; C = ceil(S / block_size) "
                         f"blocks); got values in [{int(xp.min(block_indices))}, {int(xp.max(block_indices))}]")
    return xp.astype(block_indices, xp.int64)


def _selected_tokens(p: Any, block_indices: Any, block_size: int, offset: int) -> Any:
    """Key lists ``(..., H, L, n·b)`` of the selected branch: each selected block's tokens, token-causal, −1 padding."""
    xp = p.xp
    count = int(block_indices.shape[-1])
    # per query head: kv group h // (H/G) (repeat-interleave)
    head_map = xp.arange(p.heads, dtype=xp.int64, device=p.device) // p.group
    blocks = xp.take(block_indices, head_map, axis=block_indices.ndim - 3)  # (..., H, L, n)
    within = xp.arange(block_size, dtype=xp.int64, device=p.device)
    tokens = xp.reshape(xp.expand_dims(blocks, axis=-1) * block_size + within, (*blocks.shape[:-1], count * block_size))
    query_token = xp.reshape(xp.arange(p.length, dtype=xp.int64, device=p.device) + offset, (p.length, 1))
    keep = (xp.expand_dims(blocks, axis=-1) >= 0)
    keep = xp.reshape(xp.broadcast_to(keep, (*blocks.shape, block_size)), tuple(tokens.shape))
    keep = keep & (tokens <= query_token) & (tokens < p.key_length)  # token-causal inside the blocks
    return xp.where(keep, tokens, xp.asarray(-1, dtype=xp.int64, device=p.device))


@typed_options()
def nsa_block_indices(q: Any, k: Any, /, *, block_size: int, block_counts: int, scale: float | None = None,
                      compute_dtype: Any = None) -> Any:
    """NSA's block selection: the top ``block_counts`` blocks per query and kv head, ``(..., G, L, n)``.

    .. math::

        p_{t} = \\mathrm{softmax}_c\\big(\\tau\\, q_t \\cdot \\bar k_c \\;[\\,(c+1)b - 1 \\le t\\,]\\big),\\qquad
        s_{g,t,c} = \\begin{cases} 1 & c \\in \\{0,\\ \\lfloor t/b \\rfloor - 1,\\ \\lfloor t/b \\rfloor\\} \\\\
                     \\mathrm{mean}_{h \\in g}\\, p_{h,t,c} & \\text{otherwise} \\end{cases}

    with k̄_c the mean of block c's keys, b = ``block_size``. The ``n = block_counts`` highest scores
    are kept, best first, among blocks that are visible or forced; empty slots are −1. Ties go to the
    lower block index (the forced blocks tie at 1: block 0 first). fla's ``naive_nsa_topk`` uses
    ``torch.topk``, whose order at ties is unspecified; where that matters, pass the kernel's indices
    to :func:`nsa_attention` as ``block_indices``. Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``;
    query i is token ``t = i + S − L``. Reference: Yuan et al. 2025, arXiv:2502.11089, §3.3.2 (eq. 8–11).
    """
    p = _kernels.prepare(q, k, k, compute_dtype=compute_dtype)
    block_size = check_positive_int("block_size", block_size)
    block_counts = check_positive_int("block_counts", block_counts, minimum=0)
    return _select(p, block_size, block_counts, _kernels.resolve_scale(scale, p.dim), p.key_length - p.length)


@typed_options()
def nsa_attention(q: Any, k: Any, v: Any, /, *, g_cmp: Any = None, g_slc: Any = None, g_swa: Any = None,
                  block_size: int = 64, block_counts: int = 16, block_indices: Any = None, window: int = 0,
                  scale: float | None = None, window_scale: float | None = None, return_block_indices: bool = False,
                  compute_dtype: Any = None) -> Any:
    """Native Sparse Attention: gated sum of compressed, selected-block and sliding-window attention.

    .. math::

        o_t = g^{cmp}_t\\, o^{cmp}_t + g^{slc}_t\\, o^{slc}_t + g^{swa}_t\\, o^{swa}_t,

        o^{cmp}_t = \\mathrm{softmax}_c(\\tau q_t\\cdot\\bar k_c)\\,\\bar v_c \\ \\text{over}\\ (c+1)b - 1 \\le t,
        \\quad o^{slc}_t = \\mathrm{softmax}_j(\\tau q_t\\cdot k_j)\\,v_j \\ \\text{over}\\ j \\le t,\\
        \\lfloor j/b \\rfloor \\in I_t,
        \\quad o^{swa}_t = \\mathrm{softmax}_j(\\tau_w q_t\\cdot k_j)\\,v_j \\ \\text{over}\\ t - w < j \\le t,

    with k̄_c, v̄_c the means of block c's keys and values (fla's stand-in for the paper's learned
    compression MLP; block length = stride = selection block size b) and I_t the selected blocks
    (:func:`nsa_block_indices`, or ``block_indices``). A branch with no visible key gives 0.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``;
    gates ``(..., H, L)`` (fla: ``[B, T, HQ]``); ``block_indices (..., G, L, n)`` (fla:
    ``[B, T, H, S]``), one selection per kv head shared by its query heads. Query i is token
    ``t = i + S − L`` (the last L of S tokens; fla's naive reference has L = S). GQA: query head h
    reads kv head ``h // (H/G)``. fla's kernels need H/G a power of 2 ≥ 16; reflex takes any group.

    Args:
        g_cmp, g_slc, g_swa: the gates (after the caller's sigmoid); a branch whose gate is None is
            left out (fla treats a missing ``g_slc`` as 1: pass ones). At least one is required.
        block_size: b, the compression and selection block size (fla default 64).
        block_counts: n, selected blocks per query including the forced ones (fla default 16).
        block_indices: integer ``(..., G, L, n)``, −1 = empty slot; default :func:`nsa_block_indices`.
            A block listed twice counts twice (as fla's gather).
        window: w, the sliding window (keys t − w + 1 … t); 0 = no sliding branch (fla default).
        scale: τ for the compressed and selected branches; default 1/√D.
        window_scale: τ_w for the sliding branch; default 1/√D — fla runs it with FlashAttention's
            default and ignores ``scale`` there.
        return_block_indices: also return the ``(..., G, L, n)`` indices used.
        compute_dtype: arithmetic dtype (float64 default; fla's naive reference computes in float32).

    Raises ``ValueError`` for a missing gate, gates not ``(..., H, L)``, ``block_indices`` of the wrong
    shape or out of ``[-1, ⌈S/b⌉)``, and non-positive sizes; the engine's errors for q, k, v.

    Reference: Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned and Natively Trainable
    Sparse Attention", arXiv:2502.11089, §3.2 (eq. 5: gated branches), §3.3.1–3.3.3 (compression,
    selection with forced initial and local blocks, sliding window).
    """
    run = _Setup(q, k, v, (g_cmp, g_slc, g_swa), block_size=block_size, block_counts=block_counts,
                 block_indices=block_indices, window=window, scale=scale, window_scale=window_scale,
                 compute_dtype=compute_dtype)
    out = sum(gate[..., None] * branch_out for gate, (branch_out, _) in zip(run.gates.values(), run.branches())
              if gate is not None)
    return (out, run.chosen) if return_block_indices else out


class _Setup:
    """Validated inputs of :func:`nsa_attention`, the selection, and the three branches' engine calls."""

    def __init__(self, q: Any, k: Any, v: Any, gates: tuple[Any, Any, Any], *, block_size: Any, block_counts: Any,
                 block_indices: Any, window: Any, scale: Any, window_scale: Any, compute_dtype: Any) -> None:
        p = self.p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
        self.block_size = check_positive_int("block_size", block_size)
        block_counts = check_positive_int("block_counts", block_counts, minimum=0)
        self.window = check_positive_int("window", window, minimum=0)
        self.gates = {name: _check_gate(p, name, g) for name, g in zip(("g_cmp", "g_slc", "g_swa"), gates)}
        if all(g is None for g in self.gates.values()):
            raise ValueError("pass at least one gate (g_cmp, g_slc, g_swa): a branch without a gate is left out")
        if self.gates["g_swa"] is not None and self.window == 0:
            raise ValueError("g_swa was given but window is 0 (no sliding branch); pass window >= 1")
        self.scale = _kernels.resolve_scale(scale, p.dim)
        self.window_scale = _kernels.resolve_scale(window_scale, p.dim)
        self.offset = p.key_length - p.length
        blocks = -(-p.key_length // self.block_size)
        if block_indices is None:
            self.chosen = _select(p, self.block_size, block_counts, self.scale, self.offset)
        else:
            self.chosen = _check_block_indices(p, block_indices, blocks)

    def branches(self, d_out: Any = None) -> list[tuple[Any, Any]]:
        """Per branch (compressed, selected, sliding) ``(output, gradients or None)``; ``(None, None)``
        for a branch without a gate. With ``d_out`` (the branch's own cotangents, in that order) each
        engine call's backward runs too (selection constant)."""
        from reflex.mechanisms import _grad

        p, results = self.p, []
        d_outs = d_out if d_out is not None else (None, None, None)
        if self.gates["g_cmp"] is None:
            results.append((None, None))
        else:
            pc, visible = _compressed(p, self.block_size, self.scale, self.offset)
            out = _kernels.softmax_attention(pc, scale=self.scale, mask=visible)
            grads = None if d_out is None else _grad.softmax_attention_vjp(pc, d_outs[0], None, scale=self.scale,
                                                                           mask=visible)
            results.append((out, grads))
        if self.gates["g_slc"] is None:
            results.append((None, None))
        else:
            tokens = _selected_tokens(p, self.chosen, self.block_size, self.offset)
            out, lse = _kernels.gather(p, tokens, scale=self.scale)
            grads = None if d_out is None else _kernels.gather_backward(p, tokens, out, lse, d_outs[1], None,
                                                                        scale=self.scale)
            results.append((out, grads))
        if self.gates["g_swa"] is None:
            results.append((None, None))
        else:
            band = band_pattern(self.window - 1, 0, self.offset)
            options = dict(scale=self.window_scale, mask=band.allowed, tile_active=band.tile_active)
            out = _kernels.softmax_attention(p, **options)
            results.append((out, None if d_out is None else _grad.softmax_attention_vjp(p, d_outs[2], None, **options)))
        return results


def _unpool(xp: Any, d_pooled: Any, length: int, block_size: int) -> Any:
    """Adjoint of :func:`_pool_blocks`: each position gets its block's gradient over the block's size."""
    blocks, dim = int(d_pooled.shape[-2]), int(d_pooled.shape[-1])
    full = length // block_size
    parts = []
    if full:
        spread = xp.broadcast_to(xp.expand_dims(d_pooled[..., :full, :], axis=-2),
                                 (*d_pooled.shape[:-2], full, block_size, dim))
        parts.append(xp.reshape(spread, (*d_pooled.shape[:-2], full * block_size, dim)) / block_size)
    if blocks > full:
        rest = length - full * block_size
        parts.append(xp.broadcast_to(d_pooled[..., full:, :], (*d_pooled.shape[:-2], rest, dim)) / rest)
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=-2)


def _nsa_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, block_size: int = 64, block_counts: int = 16,
             window: int = 0, scale: Any = None, window_scale: Any = None, return_block_indices: bool = False,
             compute_dtype: Any = None) -> dict:
    """VJP of :func:`nsa_attention` with the selection held constant (top-n is piecewise constant).

    ``dg_b = Σ_E dO∘o_b`` and ``do_b = g_b·dO`` per branch; the compressed branch's engine backward gives
    dq and the pooled dk̄, dv̄, spread back over each block divided by its size; the selected branch
    runs the gather kernel's backward (scatter-add over the listed tokens); the sliding branch the
    engine's band backward. dq, dk, dv are the sums over the branches.
    """
    run = _Setup(inputs["q"], inputs["k"], inputs["v"], tuple(inputs.get(n) for n in ("g_cmp", "g_slc", "g_swa")),
                 block_size=block_size, block_counts=block_counts, block_indices=inputs.get("block_indices"),
                 window=window, scale=scale, window_scale=window_scale, compute_dtype=compute_dtype)
    p = run.p
    xp = p.xp
    d_out = xp.astype(d_out, p.q.dtype)
    gates = list(run.gates.values())
    results = run.branches(tuple(None if g is None else g[..., None] * d_out for g in gates))
    d_q = xp.zeros(p.q.shape, dtype=p.q.dtype, device=p.device)
    d_k = xp.zeros(p.k.shape, dtype=p.q.dtype, device=p.device)
    d_v = xp.zeros(p.v.shape, dtype=p.q.dtype, device=p.device)
    grads = {}
    for index, (name, gate, (out, g)) in enumerate(zip(run.gates, gates, results)):
        if gate is None:
            continue
        grads[name] = xp.sum(d_out * out, axis=-1)
        d_q = d_q + g.dq
        if index == 0:  # compressed: back through the block means
            d_k = d_k + _unpool(xp, g.dk, p.key_length, run.block_size)
            d_v = d_v + _unpool(xp, g.dv, p.key_length, run.block_size)
        else:
            d_k, d_v = d_k + g.dk, d_v + g.dv
    return {"q": d_q, "k": d_k, "v": d_v, **grads}


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    length = 4 * d["L"]  # several blocks of 4
    shapes = dict(length=length, key_length=length, dim=d["D"], value_dim=d["E"])
    inputs = qkv(seed, heads=4, kv_heads=1, **shapes)
    gates = {name: random.uniform((2, 4, length), seed=(seed, 3 + i)) for i, name in enumerate(("g_cmp", "g_slc", "g_swa"))}
    decode = qkv(seed, heads=4, kv_heads=2, **{**shapes, "length": 3})
    decode_gates = {name: random.uniform((2, 4, 3), seed=(seed, 3 + i)) for i, name in enumerate(("g_cmp", "g_slc", "g_swa"))}
    blocks = -(-length // 4)
    given = random.integers((2, 1, length, 3), seed=(seed, 6), low=-1, high=blocks)
    return [
        Case("all_branches", {**inputs, **gates}, {"block_size": 4, "block_counts": 3, "window": 5}, seed=seed),
        Case("decode_gqa", {**decode, **decode_gates}, {"block_size": 4, "block_counts": 2, "window": 3}, seed=seed),
        Case("given_blocks", {**inputs, "g_slc": gates["g_slc"], "block_indices": given},
             {"block_size": 4, "block_counts": 3}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    inputs = qkv(seed, batch=(1,), heads=heads, kv_heads=1, length=seq, key_length=seq, dim=dim, value_dim=dim)
    for i, name in enumerate(("g_cmp", "g_slc", "g_swa")):
        inputs[name] = random.uniform((1, heads, seq), seed=(seed, 3 + i))
    block = max(1, min(64, seq // 4))
    return Case("example", inputs, {"block_size": block, "block_counts": 4, "window": 2 * block}, seed=seed)


register(Mechanism(
    key="nsa",
    function=nsa_attention,
    family="C. content-sparse",
    paper="Yuan et al. 2025, Native Sparse Attention (arXiv:2502.11089), §3.2-3.3",
    params={
        "g_cmp, g_slc, g_swa": "(..., H, L) gates; None leaves a branch out",
        "block_size": "compression/selection block size b (default 64)",
        "block_counts": "selected blocks per query n, forced blocks included (default 16)",
        "block_indices": "(..., G, L, n) selected blocks, -1 = empty; default: top-n of the compressed maps",
        "window": "sliding window w (keys t-w+1..t); 0 = none",
        "scale": "compressed/selected score scale, default 1/sqrt(D)",
        "window_scale": "sliding-window score scale, default 1/sqrt(D) (fla ignores scale there)",
    },
    cases=_cases,
    example=_example,
    vjp=_nsa_vjp,
))
