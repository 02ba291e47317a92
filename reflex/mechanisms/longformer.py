"""Longformer attention: (dilated) sliding window plus symmetric global attention (Beltagy et al. 2020)."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._inputs import check_padding_mask
from reflex.mechanisms._patterns import (Pattern, any_pattern, causal_offset, check_alignment, check_positive_int,
                                         check_positions, check_window, dilated_band_pattern, explicit_mask,
                                         lookup_flags, position_flags)
from reflex.mechanisms.sliding_window import check_band_implementation, band_module
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["longformer_attention"]


def _global_rows(xp: Any, device: Any, positions: tuple[int, ...], length: int, key_length: int, offset: int) -> tuple[list[int], Any]:
    """Query rows i whose position i + δ is global, and their boolean ``(L,)`` flags."""
    rows = [g - offset for g in positions if 0 <= g - offset < length]
    return rows, position_flags(xp, device, tuple(rows), length)


def local_pattern(xp: Any, device: Any, left: int, right: int, dilation: int, positions: tuple[int, ...],
                  key_length: int, offset: int) -> Pattern:
    """The local branch: the (dilated) band, plus every global key."""
    flags = position_flags(xp, device, positions, key_length)
    keys = Pattern(allowed=lambda rows, cols: lookup_flags(xp, flags, cols) & (cols >= 0),
                   tile_active=lambda i0, i1, j0, j1: any(j0 <= g < j1 for g in positions))
    return any_pattern(dilated_band_pattern(left, right, dilation, offset), keys)


def _check(p: _kernels.Prepared, window: Any, global_indices: Any, dilation: Any, alignment: Any) -> tuple[int, int, tuple[int, ...], int, int]:
    left, right = check_window(window)
    positions = check_positions("global_indices", global_indices, p.key_length)
    dilation = check_positive_int("dilation", dilation)
    return left, right, positions, dilation, causal_offset(check_alignment(alignment), p.length, p.key_length)


@typed_options()
def longformer_attention(q: Any, k: Any, v: Any, /, *, window: tuple[int, int], global_indices: Any = (),
                         dilation: int = 1, q_global: Any = None, k_global: Any = None, v_global: Any = None,
                         attention_mask: Any = None, global_mask: Any = None,
                         alignment: str = "top_left", scale: float | None = None, return_lse: bool = False,
                         compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Longformer attention: a (dilated) sliding window plus symmetric global attention.

    .. math::

        O_i = \\begin{cases}
          \\mathrm{softmax}_{j \\in W_i \\cup G}(\\mathrm{scale}\\; q_i \\cdot k_j)\\, v_j & a_i \\notin G \\\\
          \\mathrm{softmax}_{j \\in [0, S)}(\\mathrm{scale}\\; q^g_i \\cdot k^g_j)\\, v^g_j & a_i \\in G
        \\end{cases}, \\qquad W_i = \\{ a_i + d\\,t : -\\mathrm{left} \\le t \\le \\mathrm{right} \\}

    with ``a_i = i + δ``. A local query attends its window and every global key, each key once (a
    global key inside the window is not counted twice). A global query attends every key with the
    global projections ``q_global, k_global, v_global`` (default: q, k, v themselves).

    Shapes: ``q, q_global (..., H, L, D)``, ``k, k_global (..., G, S, D)``, ``v, v_global (..., G, S, E)``
    → ``out (..., H, L, E)``; GQA by head groups.

    Args:
        window: ``(left, right)`` in steps of the dilation (−1 = unbounded). Hugging Face's
            ``attention_window = w`` (even, full width) is ``window=(w // 2, w // 2)``.
        global_indices: distinct key positions with global attention (sequence of ints or 1-D array).
        dilation: d ≥ 1 for the window (Longformer §3.1; the HF implementation has d = 1).
        q_global, k_global, v_global: the separate projections of global tokens (§3.1, "Linear
            projections for global attention"); all three or none.
        attention_mask: boolean ``(..., S)`` padding mask, True = real token (Hugging Face's
            extended mask ≥ 0). As Hugging Face: padded keys leave every window and every global
            query's keys; a padded query (token ``i + δ``) outputs 0 with lse −∞.
        global_mask: boolean ``(..., S)``, True = global token, per batch item (HF's
            ``is_index_global_attn``, i.e. extended mask > 0); instead of ``global_indices``, which
            every item shares. Each item's local queries attend its own global tokens once.
        alignment: ``"top_left"`` (δ = 0) or ``"bottom_right"`` (δ = S − L).
        scale: default 1/√D for both branches (HF divides q by √D). return_lse, compute_dtype as
            :func:`full_attention`.
        implementation: ``"numba"`` for the local branch (band kernel with the global keys as extra
            keys), ``"dense"``, ``"tiled"``, or ``"auto"`` (the vectorised NumPy band kernel for plain NumPy float64; ``"numpy"``/``"numba"`` force one band kernel).

    Without separate projections the output equals ``full_attention`` with the registry pattern
    (band ∪ global columns ∪ global rows); with them, local rows equal it and global rows equal
    ``full_attention(q_global, k_global, v_global)``. Matches Hugging Face
    ``LongformerSelfAttention`` (see ``docs/conventions.md``; HF's softmax runs in float32).

    Reference: Beltagy et al. 2020, "Longformer: The Long-Document Transformer", §3.1.
    """
    given = [x is not None for x in (q_global, k_global, v_global)]
    if any(given) and not all(given):
        raise ValueError("pass all of q_global, k_global, v_global or none of them")
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    if attention_mask is not None or global_mask is not None:
        return _padded(p, q, k, v, (q_global, k_global, v_global), window=window, global_indices=global_indices,
                       dilation=dilation, attention_mask=attention_mask, global_mask=global_mask, alignment=alignment,
                       scale=scale, return_lse=return_lse, compute_dtype=compute_dtype, implementation=implementation)
    left, right, positions, dilation, offset = _check(p, window, global_indices, dilation, alignment)
    implementation = check_band_implementation(implementation)
    if implementation == "gather":
        raise ValueError("longformer has no gather kernel; use 'numba', 'dense', 'tiled' or 'auto'")
    scale = _kernels.resolve_scale(scale, p.dim)
    xp = p.xp
    band_kernel = band_module(p, implementation, q, k, v)
    if band_kernel is not None:
        flags = position_flags(xp, p.device, positions, p.key_length)
        out, lse = band_kernel.band_attention(p.q, p.k, p.v, left=left, right=right, offset=offset, dilation=dilation,
                                               scale=scale, key_ok=~flags,
                                               extra=xp.asarray(positions, dtype=xp.int64, device=p.device))
    else:
        pattern = local_pattern(xp, p.device, left, right, dilation, positions, p.key_length, offset)
        out, lse = _kernels.softmax_attention(p, scale=scale, mask=pattern.allowed, tile_active=pattern.tile_active,
                                              implementation=implementation, return_lse=True)
    rows, row_flags = _global_rows(xp, p.device, positions, p.length, p.key_length, offset)
    if rows:
        gq, gk, gv = (q, k, v) if q_global is None else (q_global, k_global, v_global)
        if tuple(gq.shape) != tuple(q.shape):
            raise ValueError(f"q_global has shape {tuple(gq.shape)}; q has {tuple(q.shape)}: they must match")
        if tuple(gk.shape) != tuple(k.shape) or tuple(gv.shape) != tuple(v.shape):
            raise ValueError(f"k_global, v_global must match k, v: got {tuple(gk.shape)}, {tuple(gv.shape)}")
        selected = xp.take(gq, xp.asarray(rows, dtype=xp.int64, device=p.device), axis=gq.ndim - 2)
        g = _kernels.prepare(selected, gk, gv, compute_dtype=compute_dtype)
        g_out, g_lse = _kernels.softmax_attention(g, scale=scale, implementation="auto", return_lse=True)
        # Row i of the global result: its rank among the global rows (0 for local rows, unused there).
        rank = [0] * p.length
        for n, r in enumerate(rows):
            rank[r] = n
        rank = xp.asarray(rank, dtype=xp.int64, device=p.device)
        out = xp.where(xp.reshape(row_flags, (p.length, 1)), xp.take(g_out, rank, axis=g_out.ndim - 2), out)
        lse = xp.where(row_flags, xp.take(g_lse, rank, axis=g_lse.ndim - 1), lse)
    return (out, lse) if return_lse else out


def _batch_flags(p: _kernels.Prepared, attention_mask: Any, global_mask: Any, positions: tuple[int, ...]) -> tuple[Any, Any]:
    """``(real, glob)``: boolean ``(..., S)`` flags per batch item (all real; globals from ``global_mask``
    or, shared by every item, ``global_indices``)."""
    xp = p.xp
    real = check_padding_mask(p, attention_mask)
    if real is None:
        real = xp.ones((*p.batch, p.key_length), dtype=xp.bool, device=p.device)
    if global_mask is not None:
        if positions:
            raise ValueError("pass global_indices (shared by the batch) or global_mask (per item), not both")
        glob = check_padding_mask(p, global_mask, "global_mask")
    else:
        glob = xp.broadcast_to(position_flags(xp, p.device, positions, p.key_length), (*p.batch, p.key_length))
    if bool(xp.any(glob & ~real)):
        raise ValueError("a global token is padding (global_mask/global_indices True where attention_mask is False); "
                         "Hugging Face's extended mask cannot express it either")
    return real, glob


def _padded(p: _kernels.Prepared, q: Any, k: Any, v: Any, projections: tuple[Any, Any, Any], *, window: Any,
            global_indices: Any, dilation: Any, attention_mask: Any, global_mask: Any, alignment: Any, scale: Any,
            return_lse: bool, compute_dtype: Any, implementation: str) -> Any:
    """Longformer with per-item padding and global tokens, on the engine (Hugging Face's semantics)."""
    left, right, positions, dilation, offset = _check(p, window, global_indices, dilation, alignment)
    implementation = check_band_implementation(implementation)
    if implementation not in ("auto", "dense", "tiled"):
        raise ValueError(f"attention_mask/global_mask run on the dense or tiled kernel; got implementation={implementation!r}")
    if offset < 0 or offset + p.length > p.key_length:
        raise ValueError(f"attention_mask needs every query to be a token: 0 <= δ and δ + L <= S; got δ = {offset}, "
                         f"L = {p.length}, S = {p.key_length}")
    xp = p.xp
    scale = _kernels.resolve_scale(scale, p.dim)
    real, glob = _batch_flags(p, attention_mask, global_mask, positions)
    local_keys = xp.reshape(real & ~glob, (*p.batch, 1, 1, p.key_length))
    global_keys = xp.reshape(glob, (*p.batch, 1, 1, p.key_length))
    band = dilated_band_pattern(left, right, dilation, offset)

    def local(rows: Any, cols: Any) -> Any:  # a window key that is real and not global, or any global key
        flat = xp.reshape(cols, (-1,))
        return ((band.allowed(rows, cols) & xp.take(local_keys, flat, axis=local_keys.ndim - 1))
                | xp.take(global_keys, flat, axis=global_keys.ndim - 1))

    query_real = xp.reshape(real[..., offset:offset + p.length], (*p.batch, 1, p.length, 1))
    # a padded query attends nothing: output 0, lse −∞ (HF zeroes its probabilities)
    out, lse = _kernels.softmax_attention(p, scale=scale, mask=(local, query_real), implementation=implementation,
                                          return_lse=True)
    query_global = glob[..., offset:offset + p.length]  # (..., L)
    any_global = query_global
    for _ in p.batch:
        any_global = xp.any(any_global, axis=0)
    rows = xp.nonzero(any_global)[0]
    if int(rows.shape[0]):
        gq, gk, gv = (q, k, v) if projections[0] is None else projections
        if tuple(gq.shape) != tuple(q.shape):
            raise ValueError(f"q_global has shape {tuple(gq.shape)}; q has {tuple(q.shape)}: they must match")
        if tuple(gk.shape) != tuple(k.shape) or tuple(gv.shape) != tuple(v.shape):
            raise ValueError(f"k_global, v_global must match k, v: got {tuple(gk.shape)}, {tuple(gv.shape)}")
        g = _kernels.prepare(xp.take(gq, rows, axis=gq.ndim - 2), gk, gv, compute_dtype=compute_dtype)
        g_out, g_lse = _kernels.softmax_attention(g, scale=scale, mask=xp.reshape(real, (*p.batch, 1, 1, p.key_length)),
                                                  implementation="auto", return_lse=True)
        # row i's rank among the global rows (0 for the others, unused there)
        rank = xp.cumulative_sum(xp.astype(any_global, xp.int64)) - 1
        rank = xp.where(rank < 0, 0, rank)
        flags = xp.reshape(query_global, (*p.batch, 1, p.length))
        out = xp.where(flags[..., None], xp.take(g_out, rank, axis=g_out.ndim - 2), out)
        lse = xp.where(flags, xp.take(g_lse, rank, axis=g_lse.ndim - 1), lse)
    return (out, lse) if return_lse else out


def _vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, **params: Any) -> dict:
    """VJP of :func:`longformer_attention` through the engine's backward.

    The forward is two engine calls: the local rows (window ∪ global keys) and the global rows
    (every key, with the global projections when given), merged row by row. The cotangents are
    split the same way — a global row's ``d_out``/``d_lse`` goes to the global call only — and each
    call's backward maps back: ``dq`` of the global call to the global rows of q (or ``q_global``),
    its ``dk``, ``dv`` to k, v (or ``k_global``, ``v_global``). With ``attention_mask``/``global_mask``
    the same split is made per batch item (:func:`_padded_vjp`).
    """
    if inputs.get("attention_mask") is not None or inputs.get("global_mask") is not None:
        return _padded_vjp(inputs, d_out, d_lse, params)
    (out, lse), calls = _kernels.run_recorded(longformer_attention, inputs, params, return_lse=True)
    local = calls[0]
    p = local.p
    xp = p.xp
    options = {n: params[n] for n in ("window", "global_indices", "dilation", "alignment") if n in params}
    _, _, positions, _, offset = _check(p, options["window"], options.get("global_indices", ()),
                                        options.get("dilation", 1), options.get("alignment", "top_left"))
    rows, row_flags = _global_rows(xp, p.device, positions, p.length, p.key_length, offset)
    d_out = xp.astype(d_out, p.q.dtype)
    d_lse = None if d_lse is None else xp.astype(d_lse, p.q.dtype)
    flags = xp.reshape(row_flags, (p.length, 1))
    g = local.backward(xp.where(flags, 0.0, d_out), None if d_lse is None else xp.where(row_flags, 0.0, d_lse))
    grads = {"q": g.dq, "k": g.dk, "v": g.dv}
    if rows:
        glob = calls[1]
        index = xp.asarray(rows, dtype=xp.int64, device=p.device)
        gg = glob.backward(xp.take(d_out, index, axis=d_out.ndim - 2),
                           None if d_lse is None else xp.take(d_lse, index, axis=d_lse.ndim - 1))
        rank = [0] * p.length
        for n, r in enumerate(rows):
            rank[r] = n
        rank = xp.asarray(rank, dtype=xp.int64, device=p.device)
        dq = xp.where(flags, xp.take(gg.dq, rank, axis=gg.dq.ndim - 2), 0.0)
        if inputs.get("q_global") is not None:
            grads.update(q_global=dq, k_global=gg.dk, v_global=gg.dv)
        else:
            grads = {"q": grads["q"] + dq, "k": grads["k"] + gg.dk, "v": grads["v"] + gg.dv}
    elif inputs.get("q_global") is not None:
        grads.update({n: xp.zeros(inputs[n].shape, dtype=p.q.dtype, device=p.device)
                      for n in ("q_global", "k_global", "v_global")})
    return grads



def _padded_vjp(inputs: dict, d_out: Any, d_lse: Any, params: dict) -> dict:
    """VJP of the padded path (:func:`_padded`): the local call's backward takes the cotangents of the
    rows that are not global *in their own item*; the global call (the union of global rows) those
    that are, per item; padded rows attended nothing and pass nothing on."""
    _, calls = _kernels.run_recorded(longformer_attention, inputs, params, return_lse=True)
    local = calls[0]
    p = local.p
    xp = p.xp
    _, _, positions, _, offset = _check(p, params["window"], params.get("global_indices", ()),
                                        params.get("dilation", 1), params.get("alignment", "top_left"))
    _, glob = _batch_flags(p, inputs.get("attention_mask"), inputs.get("global_mask"), positions)
    query_global = glob[..., offset:offset + p.length]  # (..., L), per item
    flags = xp.reshape(query_global, (*p.batch, 1, p.length))
    d_out = xp.astype(d_out, p.q.dtype)
    d_lse = None if d_lse is None else xp.astype(d_lse, p.q.dtype)
    g = local.backward(xp.where(flags[..., None], 0.0, d_out), None if d_lse is None else xp.where(flags, 0.0, d_lse))
    grads = {"q": g.dq, "k": g.dk, "v": g.dv}
    separate = inputs.get("q_global") is not None
    if len(calls) > 1:
        any_global = query_global
        for _ in p.batch:
            any_global = xp.any(any_global, axis=0)
        rows = xp.nonzero(any_global)[0]
        chosen = xp.take(flags, rows, axis=flags.ndim - 1)  # (..., 1, |U|): global in this item
        gg = calls[1].backward(xp.where(chosen[..., None], xp.take(d_out, rows, axis=d_out.ndim - 2), 0.0),
                               None if d_lse is None else xp.where(chosen, xp.take(d_lse, rows, axis=d_lse.ndim - 1), 0.0))
        rank = xp.cumulative_sum(xp.astype(any_global, xp.int64)) - 1
        rank = xp.where(rank < 0, 0, rank)
        dq = xp.where(flags[..., None], xp.take(gg.dq, rank, axis=gg.dq.ndim - 2), 0.0)
        if separate:
            grads.update(q_global=dq, k_global=gg.dk, v_global=gg.dv)
        else:
            grads = {"q": grads["q"] + dq, "k": grads["k"] + gg.dk, "v": grads["v"] + gg.dv}
    elif separate:
        grads.update({n: xp.zeros(inputs[n].shape, dtype=p.q.dtype, device=p.device)
                      for n in ("q_global", "k_global", "v_global")})
    return grads


def _pattern(q: Any, k: Any, v: Any, /, *, window: tuple[int, int], global_indices: Any = (), dilation: int = 1,
             alignment: str = "top_left", **_: Any) -> Any:
    """Band ∪ global keys ∪ global query rows as a boolean ``(..., H, L, S)`` mask."""
    p = _kernels.prepare(q, k, v)
    left, right, positions, dilation, offset = _check(p, window, global_indices, dilation, alignment)
    xp = p.xp
    local = local_pattern(xp, p.device, left, right, dilation, positions, p.key_length, offset)
    _, row_flags = _global_rows(xp, p.device, positions, p.length, p.key_length, offset)
    rows_term = Pattern(allowed=lambda rows, cols: lookup_flags(xp, row_flags, rows + 0 * cols))
    return explicit_mask(xp, p.device, p.score_shape, any_pattern(local, rows_term).allowed)


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["L"], dim=d["D"], value_dim=d["E"])
    base = qkv(seed, **shapes)
    projected = qkv(seed + 1, **shapes)
    separate = {**base, "q_global": projected["q"], "k_global": projected["k"], "v_global": projected["v"]}
    ragged = qkv(seed, heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    padded = random.uniform((2, d["L"]), seed=(seed, 9)) < 2.0  # item 1: last quarter padded
    padded[1, d["L"] - max(1, d["L"] // 4):] = False
    per_item = random.uniform((2, d["L"]), seed=(seed, 10)) < 0.0  # globals: item 0 at 0, item 1 at 1
    per_item[0, 0] = per_item[1, 1] = True
    return [
        Case("symmetric_global", base, {"window": [1, 1], "global_indices": [0]}, seed=seed),
        Case("separate_projections", separate, {"window": [1, 1], "global_indices": [0, d["L"] - 1]}, seed=seed),
        Case("dilated_bottom_right", ragged, {"window": [2, 0], "dilation": 2, "global_indices": [d["S"] - 1],
                                              "alignment": "bottom_right"}, seed=seed),
        Case("padded_per_item_globals", {**separate, "attention_mask": padded, "global_mask": per_item},
             {"window": [1, 1]}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    w = min(256, max(1, seq // 8))
    return Case("example", example_qkv(seq, heads, dim, seed), {"window": [w, w], "global_indices": [0]}, seed=seed)


register(Mechanism(
    key="longformer",
    function=longformer_attention,
    family="B. position-sparse",
    paper="Beltagy et al. 2020 §3.1 (Longformer); matches Hugging Face LongformerSelfAttention",
    params={
        "window": "(left, right) in steps of the dilation; HF attention_window w = (w/2, w/2)",
        "global_indices": "key positions with symmetric global attention",
        "dilation": "d >= 1 for the window",
        "q_global": "separate projections for global queries/keys/values (with k_global, v_global)",
        "alignment": "'top_left' | 'bottom_right'",
        "implementation": "'auto' | 'numba' | 'dense' | 'tiled'",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    pattern=_pattern,
    vjp=_vjp,
))
