"""Memory-compressed attention (MCA): keys and values shortened by a strided convolution."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._patterns import Pattern, causal_offset, parse_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._numerics import unbroadcast

__all__ = ["memory_compressed_attention"]


def _compress(p: _kernels.Prepared, name: str, weight: Any, x: Any, kernel_size: int) -> Any:
    """Strided 1-D convolution, kernel = stride = κ: ``y_t = Σ_r x_{tκ+r} W_r`` → ``(..., G, S/κ, out)``."""
    xp = p.xp
    if namespace(weight) is not xp or device_of(weight) != p.device:
        raise TypeError(f"{name} must come from the same array library and device as q ({p.device})")
    width = int(x.shape[-1])
    shape = tuple(int(n) for n in weight.shape)
    if len(shape) < 3 or shape[-3:-1] != (kernel_size, width):
        raise ValueError(f"{name} must have shape (..., kernel_size, in, out) = (..., {kernel_size}, {width}, out); got {shape}")
    if not xp.isdtype(weight.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating array; got dtype {weight.dtype}")
    lead, target = shape[:-3], (*p.batch, p.kv_heads)
    if len(lead) > len(target) or not all(a in (1, b) for a, b in zip(lead[::-1], target[::-1])):
        raise ValueError(f"{name} of shape {shape} does not broadcast to (..., G, kernel_size, in, out) with (..., G) = {target}")
    blocks = xp.reshape(x, (*x.shape[:-2], p.key_length // kernel_size, kernel_size * width))
    return blocks @ xp.reshape(xp.astype(weight, p.q.dtype), (*lead, kernel_size * width, shape[-1]))


@typed_options()
def memory_compressed_attention(q: Any, k: Any, v: Any, /, *, kernel_size: int, k_weight: Any, v_weight: Any,
                                causal: bool | str = False, scale: float | None = None, return_lse: bool = False,
                                compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Memory-compressed attention: full softmax attention over keys/values convolved with stride κ.

    .. math::

        \\tilde k_t = \\sum_{r<\\kappa} k_{t\\kappa + r} W^K_r,\\quad
        \\tilde v_t = \\sum_{r<\\kappa} v_{t\\kappa + r} W^V_r,\\qquad
        O = \\mathrm{softmax}(\\mathrm{scale}\\cdot Q \\tilde K^\\top)\\,\\tilde V

    (Liu et al. 2018, "Generating Wikipedia by Summarizing Long Sequences", §4.2.3 "Memory-compressed
    attention": a strided convolution with kernel = stride, no padding, then ordinary attention).

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E')``;
    ``k_weight (κ, D, D)`` and ``v_weight (κ, E, E')``, or with leading axes broadcasting to
    ``(..., G)`` (per-head weights). S must be a multiple of κ (nothing is silently dropped).

    Args:
        kernel_size: κ ≥ 1, kernel and stride of the convolution.
        k_weight, v_weight: the convolution weights (explicit; MCA learns them; no bias).
        causal: a compressed slot t (keys ``[tκ, tκ + κ − 1]``) is visible to query i only once all
            its keys are: ``tκ + κ − 1 ≤ i + δ`` (δ of the alignment over the original keys, so no
            future key leaks into the past). A query that sees no slot outputs 0 (lse −∞).
        scale: default 1/√D. return_lse: also the lse over the compressed keys.
        implementation: engine kernel ``"auto" | "dense" | "tiled"`` (causal tiles are skipped).

    With κ = 1 and identity weights the result is ``full_attention`` (causal included) exactly.
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be an int >= 1; got {kernel_size!r}")
    if p.key_length % kernel_size:
        raise ValueError(f"S = {p.key_length} keys is not a multiple of kernel_size = {kernel_size}: pad or trim the keys first")
    keys = _compress(p, "k_weight", k_weight, p.k, kernel_size)
    values = _compress(p, "v_weight", v_weight, p.v, kernel_size)
    if int(keys.shape[-1]) != p.dim:
        raise ValueError(f"k_weight maps keys to width {keys.shape[-1]}; q has head dim {p.dim}: they must match")
    compressed = _kernels.prepare(p.q, keys, values, compute_dtype=p.q.dtype)
    alignment = parse_causal(causal)
    mask = tile_active = None
    if alignment is not None:
        offset, last = causal_offset(alignment, p.length, p.key_length), kernel_size - 1
        pattern = Pattern(allowed=lambda rows, cols: cols * kernel_size + last <= rows + offset,
                          tile_active=lambda i0, i1, j0, j1: j0 * kernel_size + last <= i1 - 1 + offset)
        mask, tile_active = pattern.allowed, pattern.tile_active
    return _kernels.softmax_attention(compressed, scale=_kernels.resolve_scale(scale, p.dim), mask=mask,
                                      tile_active=tile_active, implementation=implementation, return_lse=return_lse)


def _compress_vjp(p: _kernels.Prepared, weight: Any, x: Any, kernel_size: int, d_y: Any) -> tuple[Any, Any]:
    """Adjoint of :func:`_compress`: ``(dx (..., G, S, in), d weight)`` from ``d_y (..., G, S/κ, out)``."""
    xp = p.xp
    from reflex.mechanisms import _grad

    shape = tuple(int(n) for n in weight.shape)
    width = int(x.shape[-1])
    blocks = xp.reshape(x, (*x.shape[:-2], p.key_length // kernel_size, kernel_size * width))
    flat = xp.reshape(xp.astype(weight, p.q.dtype), (*shape[:-3], kernel_size * width, shape[-1]))
    d_x = xp.reshape(d_y @ xp.matrix_transpose(flat), tuple(x.shape))
    d_w = unbroadcast(xp, xp.matrix_transpose(blocks) @ d_y, tuple(flat.shape))
    return d_x, xp.reshape(d_w, shape)


def _memory_compressed_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, kernel_size: int, causal: bool | str = False,
                           scale: float | None = None, compute_dtype: Any = None, implementation: str = "auto") -> dict:
    """VJP of :func:`memory_compressed_attention`: ``dq``, ``dk``, ``dv``, ``d k_weight``, ``d v_weight``.

    The engine's backward (dense, or tiled: FlashAttention-2 Alg. 2, causal tiles skipped) on the
    compressed problem gives ``dQ``, ``dK̃``, ``dṼ``; the convolution ``k̃_t = Σ_r k_{tκ+r} W_r`` is a
    matrix product of ``κ``-row blocks, so ``d k_{tκ+r} = W_r dk̃_t`` and ``dW_r = Σ_t k_{tκ+r} dk̃_tᵀ``
    (summed over the axes the weight was broadcast along); values alike.
    """
    from reflex.mechanisms import _grad

    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be an int >= 1; got {kernel_size!r}")
    if p.key_length % kernel_size:
        raise ValueError(f"S = {p.key_length} keys is not a multiple of kernel_size = {kernel_size}: pad or trim the keys first")
    k_weight, v_weight = inputs["k_weight"], inputs["v_weight"]
    keys = _compress(p, "k_weight", k_weight, p.k, kernel_size)
    values = _compress(p, "v_weight", v_weight, p.v, kernel_size)
    compressed = _kernels.prepare(p.q, keys, values, compute_dtype=p.q.dtype)
    alignment = parse_causal(causal)
    mask = tile_active = None
    if alignment is not None:
        offset, last = causal_offset(alignment, p.length, p.key_length), kernel_size - 1
        pattern = Pattern(allowed=lambda rows, cols: cols * kernel_size + last <= rows + offset,
                          tile_active=lambda i0, i1, j0, j1: j0 * kernel_size + last <= i1 - 1 + offset)
        mask, tile_active = pattern.allowed, pattern.tile_active
    g = _grad.softmax_attention_vjp(compressed, d_out, d_lse, scale=_kernels.resolve_scale(scale, p.dim), mask=mask,
                                    tile_active=tile_active, implementation=implementation)
    d_k, d_kw = _compress_vjp(p, k_weight, p.k, kernel_size, g.dk)
    d_v, d_vw = _compress_vjp(p, v_weight, p.v, kernel_size, g.dv)
    return {"q": g.dq, "k": d_k, "v": d_v, "k_weight": d_kw, "v_weight": d_vw}


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    key_length = 3 * d["L"]
    shapes = dict(heads=d["H"], length=d["L"], key_length=key_length, dim=d["D"], value_dim=d["E"])
    gqa = qkv(seed, kv_heads=d["G"], **shapes)
    weights = {
        "k_weight": random.normal((3, d["D"], d["D"]), seed=(seed, 5), std=(3 * d["D"]) ** -0.5),
        "v_weight": random.normal((d["G"], 3, d["E"], d["E"]), seed=(seed, 6), std=(3 * d["E"]) ** -0.5),
    }
    return [
        Case("kernel3", {**gqa, **weights}, {"kernel_size": 3}, seed=seed),
        Case("kernel3_causal", {**gqa, **weights}, {"kernel_size": 3, "causal": "bottom_right"}, seed=seed),
        Case("kernel3_causal_tiled", {**gqa, **weights}, {"kernel_size": 3, "causal": True, "implementation": "tiled"},
             seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    kappa = 4 if seq % 4 == 0 else 1
    weights = {name: random.normal((kappa, dim, dim), seed=(seed, 5 + i), std=(kappa * dim) ** -0.5)
               for i, name in enumerate(("k_weight", "v_weight"))}
    return Case("example", {**example_qkv(seq, heads, dim, seed), **weights}, {"kernel_size": kappa}, seed=seed)


register(Mechanism(
    key="memory_compressed",
    function=memory_compressed_attention,
    family="E. compressed memory",
    paper="Liu et al. 2018, 'Generating Wikipedia by Summarizing Long Sequences', §4.2.3",
    params={
        "kernel_size": "kappa: kernel = stride of the compressing convolution (S % kappa == 0)",
        "k_weight": "(..., kappa, D, D) key convolution weights",
        "v_weight": "(..., kappa, E, E') value convolution weights",
        "causal": "slot t visible to query i iff t*kappa + kappa - 1 <= i + delta",
        "scale": "score scale, default 1/sqrt(D)",
        "return_lse": "also the lse over the compressed keys",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    vjp=_memory_compressed_vjp,
))
