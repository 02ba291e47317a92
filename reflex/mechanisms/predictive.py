"""Predictive attention: this layer's softmax map mixed with a convolution of the previous layer's map."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import standard
from reflex.mechanisms._patterns import mask_and_causal
from reflex.mechanisms.shared_map import shared_map_attention
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["predictive_attention", "attention_map_conv2d"]


@typed_options()
def attention_map_conv2d(maps: Any, kernel: Any, /, *, bias: Any = None) -> Any:
    """2-D convolution over attention maps, heads as channels, zero "same" padding (torch ``conv2d`` semantics).

    ``maps (..., C, L, S)``, ``kernel (H, C, k_L, k_S)`` with odd k_L, k_S, ``bias (H,)`` →
    ``(..., H, L, S)``: ``y[h, i, j] = b[h] + Σ_{c,a,b} K[h, c, a, b]·x[c, i + a − k_L//2, j + b − k_S//2]``
    (cross-correlation, out-of-range entries 0).
    """
    xp = namespace(maps, kernel)
    dev = device_of(maps)
    if kernel.ndim != 4 or maps.ndim < 3 or int(kernel.shape[1]) != int(maps.shape[-3]):
        raise ValueError(f"kernel must have shape (H, C, k_L, k_S) with C = {int(maps.shape[-3]) if maps.ndim >= 3 else '?'} "
                         f"channels of maps (..., C, L, S); got kernel {tuple(kernel.shape)}, maps {tuple(maps.shape)}")
    kl, ks = int(kernel.shape[2]), int(kernel.shape[3])
    if kl % 2 == 0 or ks % 2 == 0:
        raise ValueError(f"kernel sizes must be odd (centred 'same' padding); got {(kl, ks)}")
    *lead, channels, length, key_length = (int(n) for n in maps.shape)
    pl, ps = kl // 2, ks // 2
    zeros_rows = xp.zeros((*lead, channels, pl, key_length), dtype=maps.dtype, device=dev)
    padded = xp.concat([zeros_rows, maps, zeros_rows], axis=-2)
    zeros_cols = xp.zeros((*lead, channels, length + 2 * pl, ps), dtype=maps.dtype, device=dev)
    padded = xp.concat([zeros_cols, padded, zeros_cols], axis=-1)
    nb = len(lead)
    to_last = (*range(nb), nb + 1, nb + 2, nb)  # (..., C, L, S) -> (..., L, S, C)
    out = None
    for a in range(kl):
        for b in range(ks):
            window = xp.permute_dims(padded[..., a:a + length, b:b + key_length], to_last)
            term = window @ xp.matrix_transpose(kernel[:, :, a, b])
            out = term if out is None else out + term
    if bias is not None:
        if tuple(bias.shape) != (int(kernel.shape[0]),):
            raise ValueError(f"bias must have shape ({int(kernel.shape[0])},) (one per output channel); got {tuple(bias.shape)}")
        out = out + bias  # out is (..., L, S, H) here
    return xp.permute_dims(out, (*range(nb), nb + 2, nb, nb + 1))


@typed_options()
def predictive_attention(q: Any, k: Any, v: Any, /, *, prev_weights: Any, kernel: Any, alpha: float = 0.5,
                         kernel_bias: Any = None, mask: Any = None, causal: bool | str = False,
                         scale: float | None = None, return_weights: bool = False, compute_dtype: Any = None) -> Any:
    """Predictive attention: α·softmax(scores) + (1−α)·conv2d(previous attention map), times V.

    .. math::

        A_l = \\alpha\\, \\mathrm{softmax}\\big(\\mathrm{scale}\\cdot Q K^\\top + \\log\\mathrm{mask}\\big)
              + (1 - \\alpha)\\, \\mathrm{Conv2d}(A_{l-1}),\\qquad O_l = A_l V

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)``, ``prev_weights``
    A_{l−1} ``(..., C, L, S)`` (the previous layer's maps, its heads as channels), ``kernel``
    ``(H, C, k_L, k_S)`` (odd sizes), ``kernel_bias (H,)`` → ``out (..., H, L, E)`` (and the mixed
    map A_l ``(..., H, L, S)`` with ``return_weights``, to feed the next layer). The convolution is a
    cross-correlation with zero "same" padding, as ``torch.nn.functional.conv2d(padding="same")``
    (see :func:`attention_map_conv2d`). Conventions fixed here: the convolved map is neither
    renormalised nor masked (rows of A_l sum to α + (1−α)·(row sums of the convolution)), and
    ``mask``/``causal`` apply to the softmax part only, whose weights are the engine's.

    Reference: Wang et al. 2021, "Predictive Attention Transformer: Improving Transformer with
    Attention Map Prediction" (arXiv 2102.12895v1), §3 (eq. 4–5); published as "Evolving
    Attention with Residual Convolutions", ICML 2021, which moves the convolution before the softmax.
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number; got {alpha!r}")
    for name, a in (("prev_weights", prev_weights), ("kernel", kernel), ("kernel_bias", kernel_bias)):
        if a is not None and (namespace(a) is not xp or device_of(a) != p.device):
            raise TypeError(f"{name} must be an array of q's library on q's device")
    expected = (*p.batch, p.length, p.key_length)
    if prev_weights.ndim != len(p.batch) + 3 or (*prev_weights.shape[:-3], *prev_weights.shape[-2:]) != expected:
        raise ValueError(f"prev_weights must have shape (..., C, L, S) with (...), L, S = {p.batch}, {p.length}, "
                         f"{p.key_length}; got {tuple(prev_weights.shape)}")
    if kernel.ndim != 4 or int(kernel.shape[0]) != p.heads:
        raise ValueError(f"kernel must have shape (H, C, k_L, k_S) with H = {p.heads}; got {tuple(kernel.shape)}")
    predicted = attention_map_conv2d(xp.astype(prev_weights, p.q.dtype), xp.astype(kernel, p.q.dtype),
                                     bias=None if kernel_bias is None else xp.astype(kernel_bias, p.q.dtype))
    masks, _ = mask_and_causal(p, mask, causal)
    current = _kernels.weights(p, scale=_kernels.resolve_scale(scale, p.dim), mask=masks)
    mixed = float(alpha) * current + (1.0 - float(alpha)) * predicted
    out = shared_map_attention(mixed, p.v, compute_dtype=p.q.dtype)
    return (out, mixed) if return_weights else out


def _conv2d_vjp(xp: Any, maps: Any, kernel: Any, d_y: Any) -> tuple[Any, Any, Any]:
    """Adjoint of :func:`attention_map_conv2d`: ``(d maps, d kernel, d bias)`` from ``d_y (..., H, L, S)``.

    ``d maps`` is the same-padded correlation of ``d_y`` with the kernel flipped in both spatial axes and
    its channel axes swapped; ``dK[h, c, a, b] = Σ d_y[h, i, j]·x_pad[c, i + a, j + b]`` (over batch and
    positions); ``d bias_h = Σ d_y[h]``.
    """
    d_maps = attention_map_conv2d(d_y, xp.flip(xp.permute_dims(kernel, (1, 0, 2, 3)), axis=(2, 3)))
    kl, ks = int(kernel.shape[2]), int(kernel.shape[3])
    *lead, channels, length, key_length = (int(n) for n in maps.shape)
    pl, ps = kl // 2, ks // 2
    rows = xp.zeros((*lead, channels, pl, key_length), dtype=maps.dtype, device=maps.device)
    padded = xp.concat([rows, maps, rows], axis=-2)
    cols = xp.zeros((*lead, channels, length + 2 * pl, ps), dtype=maps.dtype, device=maps.device)
    padded = xp.concat([cols, padded, cols], axis=-1)
    heads = int(d_y.shape[-3])
    d_flat = xp.reshape(xp.permute_dims(xp.reshape(d_y, (-1, heads, length * key_length)), (1, 0, 2)), (heads, -1))
    taps = []
    for a in range(kl):
        for b in range(ks):
            window = xp.reshape(padded[..., a:a + length, b:b + key_length], (-1, channels, length * key_length))
            window = xp.reshape(xp.permute_dims(window, (1, 0, 2)), (channels, -1))
            taps.append(d_flat @ xp.matrix_transpose(window))  # (H, C)
    d_kernel = xp.reshape(xp.stack(taps, axis=-1), (heads, channels, kl, ks))
    return d_maps, d_kernel, xp.sum(d_flat, axis=-1)


def _predictive_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, alpha: float = 0.5, mask: Any = None,
                    causal: bool | str = False, scale: float | None = None, return_weights: bool = False,
                    compute_dtype: Any = None) -> dict:
    """VJP of :func:`predictive_attention`: ``dq``, ``dk``, ``dv``, ``d prev_weights``, ``d kernel``,
    ``d kernel_bias`` and, when ``inputs`` holds ``alpha`` as a 0-d floating array, ``d alpha``.

    With ``A = αC + (1 − α)·Conv(A_prev)``, ``O = A V``: ``dA = dO Vᵀ``, ``dV = Σ_{h → g} Aᵀ dO``,
    ``dα = ⟨dA, C − Conv(A_prev)⟩``; the softmax part ``dZ = C ∘ (α dA − rowsum(C ∘ α dA))`` (masked
    entries 0) gives ``dQ = scale·dZ K``, ``dK = scale·Σ dZᵀ Q``; the convolution part
    ``(1 − α) dA`` goes through :func:`_conv2d_vjp`. ``return_weights=True`` is refused (the VJP
    differentiates ``out``).
    """
    from reflex.mechanisms import _grad

    if return_weights:
        raise ValueError("the VJP differentiates out only; call it with return_weights=False")
    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = p.xp
    alpha = float(inputs["alpha"]) if "alpha" in inputs else float(alpha)
    prev = xp.astype(inputs["prev_weights"], p.q.dtype)
    kernel = xp.astype(inputs["kernel"], p.q.dtype)
    bias = inputs.get("kernel_bias")
    predicted = attention_map_conv2d(prev, kernel, bias=None if bias is None else xp.astype(bias, p.q.dtype))
    masks, _ = mask_and_causal(p, mask, causal)
    resolved = _kernels.resolve_scale(scale, p.dim)
    current = _kernels.weights(p, scale=resolved, mask=masks)
    mixed = alpha * current + (1.0 - alpha) * predicted
    d_o = _grad.group_queries(p, xp.astype(d_out, p.q.dtype))
    v = xp.expand_dims(p.v, axis=-3)
    d_mixed = d_o @ xp.matrix_transpose(v)  # grouped (..., G, H/G, L, S)
    d_v = xp.sum(xp.matrix_transpose(_grad.group_queries(p, mixed)) @ d_o, axis=-3)
    d_z = _grad.softmax_vjp(xp, _grad.group_queries(p, current), alpha * d_mixed)
    k = xp.expand_dims(p.k, axis=-3)
    grads = {"q": _grad.ungroup(p, resolved * (d_z @ k)),
             "k": resolved * xp.sum(xp.matrix_transpose(d_z) @ _grad.group_queries(p, p.q), axis=-3), "v": d_v}
    d_mixed = _grad.ungroup(p, d_mixed)
    grads["prev_weights"], grads["kernel"], d_bias = _conv2d_vjp(xp, prev, kernel, (1.0 - alpha) * d_mixed)
    if bias is not None:
        grads["kernel_bias"] = d_bias
    if "alpha" in inputs:
        grads["alpha"] = xp.sum(d_mixed * (current - predicted))
    return grads


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    prev = random.uniform((2, d["H"], d["L"], d["S"]), seed=(seed, 3))
    prev = prev / prev.sum(-1, keepdims=True)
    kernel = random.normal((d["H"], d["H"], 3, 3), seed=(seed, 4), std=1 / 3)
    return [
        Case("conv3x3", {**gqa, "prev_weights": prev, "kernel": kernel}, {"alpha": 0.5}, seed=seed),
        Case("conv1x3_bias_causal", {**gqa, "prev_weights": prev[:, :2], "kernel": kernel[:, :2, 1:2, :],
                                     "kernel_bias": random.normal((d["H"],), seed=(seed, 5))},
             {"alpha": 0.25, "causal": True}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    inputs = {name: random.normal((1, heads, seq, dim), seed=(seed, i)) for i, name in enumerate("qkv")}
    prev = random.uniform((1, heads, seq, seq), seed=(seed, 3))
    inputs["prev_weights"] = prev / prev.sum(-1, keepdims=True)
    inputs["kernel"] = random.normal((heads, heads, 3, 3), seed=(seed, 4), std=1 / 3)
    return Case("example", inputs, {}, seed=seed)


register(Mechanism(
    key="predictive",
    function=predictive_attention,
    family="G. prior",
    paper="Wang et al. 2021, Predictive Attention Transformer (arXiv 2102.12895v1), §3",
    params={"prev_weights": "A_{l-1} (..., C, L, S): previous layer's attention maps",
            "kernel": "(H, C, k_L, k_S) conv2d kernel, odd sizes, zero same padding",
            "kernel_bias": "(H,) conv bias", "alpha": "mixing weight of the current softmax map",
            "mask": "as full (softmax part)", "causal": "as full (softmax part)",
            "return_weights": "also return the mixed map A_l"},
    cases=_cases,
    example=_example,
    vjp=_predictive_vjp,
))
