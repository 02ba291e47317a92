"""Sliding-window (band) attention, and the Numba dispatch shared by the band-shaped mechanisms."""

from __future__ import annotations

import importlib
from typing import Any

from reflex import random
from reflex.backends import is_plain_numpy
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import qkv, standard
from reflex.mechanisms._engine.extra import active as extra_terms_active
from reflex.mechanisms._engine.extra import sequence_offset
from reflex.mechanisms._patterns import (Pattern, all_patterns, causal_offset, check_alignment, check_window,
                                         chunk_pattern, dilated_band_pattern, explicit_mask, sink_band_pattern)
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import Int, typed_options

__all__ = ["sliding_window_attention"]

# Kernel choices of the band mechanisms: the engine's, the gather kernel, and the two band kernels
# for plain NumPy float64 inputs ("numpy": vectorised NumPy, "numba": the Numba twin).
BAND_IMPLEMENTATIONS = ("auto", "dense", "tiled", "gather", "numpy", "numba")
_BAND_MODULES = {"auto": "reflex.backends.band", "numpy": "reflex.backends.band",
                 "numba": "reflex.backends.numba_kernels.window"}


def check_band_implementation(implementation: Any) -> str:
    """``implementation`` among :data:`BAND_IMPLEMENTATIONS`."""
    if implementation not in BAND_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(BAND_IMPLEMENTATIONS)}; got {implementation!r}")
    return implementation


def band_module(p: _kernels.Prepared, implementation: str, *arrays: Any) -> Any:
    """The band kernel module (``band_attention``, ``range_attention``) when the band should run
    there, else None.

    ``"auto"`` takes the vectorised NumPy band kernel (:mod:`reflex.backends.band`; it measures
    faster than the Numba kernel, whose scalar ``exp`` dominates) when every input array is plain
    NumPy and the compute dtype is float64; ``"numpy"`` and ``"numba"``
    (:mod:`reflex.backends.numba_kernels.window`) insist, and raise ``ValueError`` when the inputs
    do not allow it.
    """
    if implementation not in _BAND_MODULES:
        return None
    if extra_terms_active() is not None:  # a caller's mask/bias/softcap/lengths: the engine composes them
        if implementation != "auto":
            raise ValueError(f"implementation={implementation!r} takes no mask/bias/softcap/seqlens options; use "
                             f"'dense', 'tiled' or 'auto'")
        return None
    eligible = all(is_plain_numpy(a) for a in arrays if a is not None) and p.q.dtype == p.xp.float64
    if not eligible:
        if implementation != "auto":
            raise ValueError(f"implementation={implementation!r} needs plain NumPy float inputs and compute_dtype float64")
        return None
    return importlib.import_module(_BAND_MODULES[implementation])


def band_indices(p: _kernels.Prepared, left: int, right: int, offset: int, dilation: int = 1) -> Any:
    """Key lists ``(L, K)`` of a (dilated) band for the gather kernel; −1 pads keys outside ``[0, S)``.

    Query i lists ``i + δ + d·t`` for ``t = −left, …, right``; an unbounded side lists every key,
    masked to the band.
    """
    xp = p.xp
    rows = xp.reshape(xp.arange(p.length, dtype=xp.int64, device=p.device), (p.length, 1))
    allowed = dilated_band_pattern(left, right, dilation, offset).allowed
    if left < 0 or right < 0:  # an unbounded side: every key, masked to the band
        cols = xp.reshape(xp.arange(p.key_length, dtype=xp.int64, device=p.device), (1, p.key_length))
    elif dilation == 1:  # a contiguous run of K keys, shifted inside [0, S) at the edges
        count = min(left + right + 1, p.key_length)
        start = xp.clip(rows + offset - left, 0, max(p.key_length - count, 0))
        cols = start + xp.reshape(xp.arange(count, dtype=xp.int64, device=p.device), (1, count))
    else:
        steps = xp.arange(-left, right + 1, dtype=xp.int64, device=p.device)
        cols = rows + offset + dilation * xp.reshape(steps, (1, left + right + 1))
    keep = allowed(rows, cols) & (cols >= 0) & (cols < p.key_length)
    return xp.where(keep, cols, -1)


def window_pattern(p: _kernels.Prepared, left: int, right: int, offset: Any, sink_tokens: int = 0,
                   attention_chunk: int | None = None) -> Pattern:
    """The band of :func:`sliding_window_attention`, its first ``sink_tokens`` keys escaping the left bound,
    intersected with Llama-4 chunks of ``attention_chunk`` keys (counted from the bottom-right position)."""
    pattern = sink_band_pattern(left, right, offset, sink_tokens)
    if attention_chunk is not None:
        pattern = all_patterns(pattern, chunk_pattern(attention_chunk, sequence_offset(
            p, "bottom_right", p.key_length - p.length)))
    return pattern


@typed_options(sink_tokens=Int(minimum=0), attention_chunk=Int(minimum=1, optional=True))
def sliding_window_attention(q: Any, k: Any, v: Any, /, *, window: tuple[int, int], alignment: str = "top_left",
                             sink_tokens: int = 0, attention_chunk: int | None = None, scale: float | None = None,
                             dropout_mask: Any = None, dropout_p: float = 0.0, return_lse: bool = False,
                             compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Sliding-window attention: each query attends the keys within ``(left, right)`` of its position.

    .. math::

        O_i = \\mathrm{softmax}_{j \\in W_i}(\\mathrm{scale}\\; q_i \\cdot k_j)\\, v_j, \\qquad
        W_i = \\{\\, j : i + \\delta - \\mathrm{left} \\le j \\le i + \\delta + \\mathrm{right} \\,\\}

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``out (..., H, L, E)``
    (and ``lse (..., H, L)`` with ``return_lse``). GQA: query head h reads kv head ``h // (H/G)``.

    Args:
        window: ``(left, right)`` ints ≥ −1 or ``None``; −1 or ``None`` (flash-attn 4's spelling) leaves that
            side unbounded. ``(left, 0)`` is causal
            attention with a look-back of ``left`` keys; ``(0, 0)`` is self only; ``(-1, -1)`` is full.
            Same semantics as flash-attn ``window_size`` and the ONNX Attention (opset 25)
            ``left_window_size`` / ``right_window_size`` attributes.
        alignment: ``"top_left"`` (δ = 0: query i sits at key i) or ``"bottom_right"`` (δ = S − L:
            the last query sits at the last key, as flash-attn and ONNX with a KV cache of S − L).
        sink_tokens: n ≥ 0, StreamingLLM sink tokens (flash-attn ``sink_token_length``): keys j < n
            escape the left window bound (still bound on the right), for every query, including the
            queries that sit on a sink position.
        attention_chunk: c ≥ 1, Llama-4 chunked attention intersected with the window: query i sits at
            ``t = i + S − L`` (bottom-right, whatever ``alignment`` says) and sees only keys
            ``c·⌊t/c⌋ ≤ j < c·⌊t/c⌋ + c`` (flash-attn 3 ``attention_chunk``).
        scale: multiplies q·k; default 1/√D.
        dropout_mask: boolean keep mask broadcastable to ``(..., H, L, S)`` (True = keep), read when
            ``dropout_p > 0``: ``O = (P∘M)·V/(1 − p)``, lse undropped (as :func:`full_attention`).
            The band kernels do not take it: ``"auto"`` runs the engine then, ``"numpy"`` and
            ``"numba"`` raise ``ValueError``.
        dropout_p: dropout rate in [0, 1); 0 (default) is no dropout.
        return_lse: also return the natural-log logsumexp of each row's scores.
        compute_dtype: arithmetic dtype (default float64).
        implementation: ``"numpy"`` (vectorised windowed-softmax kernel: plain NumPy inputs,
            float64, memory O(L·window)), ``"numba"`` (its Numba twin), ``"dense"``, ``"tiled"``
            (online softmax skipping tiles off the band), ``"gather"`` (each query's band as an
            index list), or ``"auto"`` (``"numpy"`` for plain NumPy inputs in float64, otherwise
            the engine's dense/tiled choice).

    A query whose window holds no key (possible for L ≠ S or a negative offset) outputs 0 with lse −∞.
    The output equals ``full_attention(q, k, v, mask=pattern)`` with the band as a boolean mask.

    References: Beltagy et al. 2020, "Longformer", §3.1 (sliding window); Child et al. 2019 §4.2
    (local attention); flash-attn ``window_size`` (Dao 2023).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    left, right = check_window(window)
    offset = causal_offset(check_alignment(alignment), p.length, p.key_length)
    implementation = check_band_implementation(implementation)
    scale = _kernels.resolve_scale(scale, p.dim)
    dropout = _kernels.check_dropout(p, dropout_mask, dropout_p)
    beyond_band = [name for name, given in (("dropout_mask", dropout is not None), ("sink_tokens", sink_tokens > 0),
                                            ("attention_chunk", attention_chunk is not None)) if given]
    if beyond_band and implementation in ("numpy", "numba"):
        raise ValueError(f"implementation={implementation!r} (a band kernel) does not take {', '.join(beyond_band)}; "
                         f"use 'auto', 'dense', 'tiled' or 'gather'")
    band_kernel = band_module(p, implementation, q, k, v) if not beyond_band else None
    offset = sequence_offset(p, alignment, offset)  # per sequence with padded lengths (a (B, 1, 1, 1) array)
    if band_kernel is not None:
        out, lse = band_kernel.band_attention(p.q, p.k, p.v, left=left, right=right, offset=offset, scale=scale)
    elif implementation == "gather":
        if sink_tokens > 0 or attention_chunk is not None:  # every key listed, masked to the pattern
            allowed = window_pattern(p, left, right, offset, sink_tokens, attention_chunk).allowed
            rows = p.xp.reshape(p.xp.arange(p.length, dtype=p.xp.int64, device=p.device), (p.length, 1))
            cols = p.xp.reshape(p.xp.arange(p.key_length, dtype=p.xp.int64, device=p.device), (1, p.key_length))
            indices = p.xp.where(allowed(rows, cols), cols, -1)
        else:
            indices = band_indices(p, left, right, offset)
        out, lse = _kernels.gather(p, indices, scale=scale, dropout=dropout)
    else:
        pattern = window_pattern(p, left, right, offset, sink_tokens, attention_chunk)
        return _kernels.softmax_attention(p, scale=scale, mask=pattern.allowed, tile_active=pattern.tile_active,
                                          implementation=implementation, return_lse=return_lse, dropout=dropout)
    return (out, lse) if return_lse else out


def _pattern(q: Any, k: Any, v: Any, /, *, window: tuple[int, int], alignment: str = "top_left", sink_tokens: int = 0,
             attention_chunk: int | None = None, **_: Any) -> Any:
    """The band (with its sink tokens and chunks) as a boolean ``(..., H, L, S)`` mask."""
    p = _kernels.prepare(q, k, v)
    left, right = check_window(window)
    offset = causal_offset(check_alignment(alignment), p.length, p.key_length)
    pattern = window_pattern(p, left, right, offset, sink_tokens, attention_chunk)
    return explicit_mask(p.xp, p.device, p.score_shape, pattern.allowed)


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    w = max(1, d["L"] // 4)
    return [
        Case("symmetric", gqa, {"window": [w, w]}, seed=seed),
        Case("causal", gqa, {"window": [w, 0]}, seed=seed),
        Case("bottom_right", gqa, {"window": [w, 1], "alignment": "bottom_right"}, seed=seed),
        Case("unbounded_left", gqa, {"window": [-1, 1]}, seed=seed),
        Case("self_only", gqa, {"window": [0, 0]}, seed=seed),
        Case("causal_sinks", {**gqa, "sinks": random.normal((d["H"],), seed=(seed, 5))}, {"window": [w, 0]}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    d = dict(heads=heads, kv_heads=heads, length=seq, key_length=seq, dim=dim, value_dim=dim)
    w = min(256, max(1, seq // 8))
    return Case("example", qkv(seed, batch=(1,), **d), {"window": [w, w]}, seed=seed)


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """Dense ``full_attention`` with the band mask."""
    from reflex.mechanisms.full import full_attention

    params = {n: val for n, val in params.items() if n not in ("implementation",)}
    mask = _pattern(q, k, v, **params)
    rest = {n: val for n, val in params.items() if n not in ("window", "alignment", "sink_tokens", "attention_chunk")}
    return full_attention(q, k, v, mask=mask, implementation="dense", **rest)


register(Mechanism(
    key="sliding_window",
    function=sliding_window_attention,
    family="B. position-sparse",
    paper="Beltagy et al. 2020 §3.1 (Longformer sliding window); Child et al. 2019 §4.2; flash-attn window_size",
    params={
        "window": "(left, right): key j allowed iff i + d - left <= j <= i + d + right; -1 or None = unbounded",
        "sink_tokens": "n: keys j < n escape the left bound (StreamingLLM; flash-attn sink_token_length)",
        "attention_chunk": "c: also j in the chunk c*floor(t/c) <= j < c*floor(t/c) + c of t = i + S - L (Llama 4)",
        "alignment": "'top_left' (d = 0) | 'bottom_right' (d = S - L)",
        "implementation": "'auto' | 'numpy' | 'numba' | 'dense' | 'tiled' | 'gather'",
        "dropout_mask": "boolean keep mask (..., H, L, S)-broadcastable, True = keep (with dropout_p > 0)",
        "dropout_p": "dropout rate p in [0, 1): O = (P*M) V / (1 - p), lse undropped; 0 = no dropout",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    example=_example,
    pattern=_pattern,
    vjp=_kernels.engine_vjp(sliding_window_attention),
))
