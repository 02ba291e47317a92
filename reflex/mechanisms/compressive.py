"""Compressive Transformer attention (Rae et al. 2020): recurrent memory plus a compressed memory of evicted positions."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._patterns import causal_pattern, check_positive_int
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["compressive_attention"]

COMPRESSIONS = ("mean", "conv")


def _compress(xp: Any, x: Any, rate: int, weights: Any) -> Any:
    """Slots ``(..., ⌊S/r⌋, F)``: slot u from positions ``[u·r, (u+1)·r)`` (mean, or Σ_t x_{ur+t} W_t)."""
    count = int(x.shape[-2]) // rate
    blocks = xp.reshape(x[..., :count * rate, :], (*x.shape[:-2], count, rate, x.shape[-1]))
    if weights is None:
        return xp.mean(blocks, axis=-2)
    slots = blocks[..., 0, :] @ weights[0, ...]
    for t in range(1, rate):
        slots = slots + blocks[..., t, :] @ weights[t, ...]
    return slots


def _check_conv(xp: Any, device: Any, name: str, weights: Any, rate: int, feature: int, dtype: Any) -> Any:
    if weights is None:
        raise ValueError(f"compression='conv' needs {name} of shape (rate, F, F) = ({rate}, {feature}, {feature})")
    if tuple(int(n) for n in weights.shape) != (rate, feature, feature):
        raise ValueError(f"{name} must have shape (rate, F, F) = ({rate}, {feature}, {feature}); got {tuple(weights.shape)}")
    return _kernels.check_array(xp, device, dtype, name, weights)


@typed_options()
def compressive_attention(q: Any, k: Any, v: Any, /, *, segment_length: int, memory_length: int,
                          compressed_length: int, rate: int, compression: str = "mean", conv_k: Any = None,
                          conv_v: Any = None, scale: float | None = None, return_lse: bool = False,
                          compute_dtype: Any = None) -> Any:
    """Compressive memory: segments attend n_c compressed slots of evicted positions, m cached ones, and themselves.

    .. math::

        o_i = \\mathrm{softmax}\\big(\\mathrm{scale}\\; q_i [\\,\\hat K_{C(i)};\\, K_{W(i)}]^\\top\\big)
              [\\,\\hat V_{C(i)};\\, V_{W(i)}], \\qquad
        \\hat k_u = f_c(k_{ur}, \\dots, k_{ur + r - 1})

    For query i in segment c (start A = c·s): W(i) = [A − m, i] is the recurrent memory plus the
    causal segment (as :func:`reflex.recurrent_memory_attention`); positions before A − m have been
    evicted, and slot u compresses positions ``[u·r, (u+1)·r)`` once all of them are evicted
    (``(u+1)·r ≤ A − m``); C(i) is the last ``compressed_length`` such slots.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, L, D)``, ``v (..., G, L, E)`` (self-attention, S = L),
    ``conv_k (r, D, D)``, ``conv_v (r, E, E)`` → ``(..., H, L, E)``.

    Args:
        segment_length, memory_length: s ≥ 1 and m ≥ 0, as in recurrent memory.
        compressed_length: n_c ≥ 0 compressed slots kept (the oldest are dropped).
        rate: r ≥ 1 evicted positions per slot.
        compression: ``"mean"`` (mean pooling) or ``"conv"`` (a 1-D convolution with kernel and
            stride r: ``k̂_u = Σ_t k_{ur+t} conv_k[t]``, the same for v with ``conv_v``).
        scale, return_lse, compute_dtype: as :func:`reflex.full_attention`.

    Conventions decided here: compression acts on keys and values directly (the paper compresses
    hidden states before projecting; for linear compressions such as these, compressing then
    projecting equals projecting then compressing); slots are aligned to multiples of r from
    position 0, independent of segment boundaries (the paper compresses each evicted segment; the
    two agree when r divides s and s divides m). Rate 1 with identity ``conv`` (or ``"mean"``) is
    exactly recurrent memory of length m + n_c.

    Reference: Rae et al. 2020, "Compressive Transformers for Long-Range Sequence Modelling",
    ICLR, §3 (Algorithm 1) and §3.1 (compression functions).
    """
    s = check_positive_int("segment_length", segment_length)
    m = check_positive_int("memory_length", memory_length, minimum=0)
    n_c = check_positive_int("compressed_length", compressed_length, minimum=0)
    r = check_positive_int("rate", rate)
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}; got {compression!r}")
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    if p.key_length != p.length:
        raise ValueError(f"k has {p.key_length} positions; q has {p.length}: compressive attention is self-attention (S = L)")
    xp, dtype = p.xp, p.q.dtype
    if compression == "conv":
        conv_k = _check_conv(xp, p.device, "conv_k", conv_k, r, p.dim, dtype)
        conv_v = _check_conv(xp, p.device, "conv_v", conv_v, r, p.value_dim, dtype)
    elif conv_k is not None or conv_v is not None:
        raise ValueError("conv_k and conv_v are only used with compression='conv'")
    scale = _kernels.resolve_scale(scale, p.dim)
    if p.length == 0:
        out, lse = _kernels.empty_result(p)
        return (out, lse) if return_lse else out
    slots_k = _compress(xp, p.k, r, conv_k)
    slots_v = _compress(xp, p.v, r, conv_v)
    outs, lses = [], []
    for start in range(0, p.length, s):
        stop = min(start + s, p.length)
        first = max(0, start - m)
        ready = first // r  # slots whose positions are all evicted
        oldest = max(0, ready - n_c)
        keys = xp.concat([slots_k[..., oldest:ready, :], p.k[..., first:stop, :]], axis=-2)
        values = xp.concat([slots_v[..., oldest:ready, :], p.v[..., first:stop, :]], axis=-2)
        segment = _kernels.prepare(p.q[..., start:stop, :], keys, values, compute_dtype=dtype)
        # compressed slots precede every query; bottom-right causal on the rest
        causal = causal_pattern("bottom_right", segment.length, segment.key_length)
        out, lse = _kernels.dense(segment, scale=scale, mask=causal.allowed)
        outs.append(out)
        lses.append(lse)
    out = xp.concat(outs, axis=-2)
    return (out, xp.concat(lses, axis=-1)) if return_lse else out

def _place(xp: Any, x: Any, start: int, total: int) -> Any:
    """``x (..., n, F)`` at rows ``start … start + n`` of zeros ``(..., total, F)``."""
    before = xp.zeros((*x.shape[:-2], start, x.shape[-1]), dtype=x.dtype, device=device_of(x))
    after = xp.zeros((*x.shape[:-2], total - start - int(x.shape[-2]), x.shape[-1]), dtype=x.dtype, device=device_of(x))
    return xp.concat([before, x, after], axis=-2)


def _compress_vjp(xp: Any, x: Any, rate: int, weights: Any, d_slots: Any) -> tuple[Any, Any]:
    """The adjoint of :func:`_compress` at ``x``: ``(dx, d_weights or None)``."""
    count = int(d_slots.shape[-2])
    length, feature = int(x.shape[-2]), int(x.shape[-1])
    if weights is None:
        d_blocks = xp.broadcast_to(xp.expand_dims(d_slots / rate, axis=-2), (*d_slots.shape[:-2], count, rate, feature))
        d_weights = None
    else:
        blocks = xp.reshape(x[..., :count * rate, :], (*x.shape[:-2], count, rate, feature))
        flat_d = xp.reshape(d_slots, (-1, int(d_slots.shape[-1])))
        d_weights = xp.stack([xp.matrix_transpose(xp.reshape(blocks[..., t, :], (-1, feature))) @ flat_d
                              for t in range(rate)], axis=0)
        d_blocks = xp.stack([d_slots @ xp.matrix_transpose(weights[t, ...]) for t in range(rate)], axis=-2)
    dx = xp.reshape(d_blocks, (*d_slots.shape[:-2], count * rate, feature))
    return _place(xp, dx, 0, length), d_weights


def _vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, **params: Any) -> dict:
    """VJP of :func:`compressive_attention` through the engine's backward.

    One dense engine call per segment over ``[slots; cached and own keys]``: its ``dq`` is the
    segment's rows of ``dq``, its ``dk``/``dv`` split into the slot part (accumulated into the slots'
    cotangents) and the raw part (added to ``dk``/``dv`` at the cached positions). The slots go back
    through the compression: mean (each position gets 1/r of its slot) or conv (``d blocks_t =
    d slots·W_tᵀ``, ``dW_t = Σ blocks_tᵀ·d slots``).
    """
    result, calls = _kernels.run_recorded(compressive_attention, inputs, params, return_lse=d_lse is not None)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    xp = namespace(q, k, v)
    dtype = _kernels.resolve_dtype(xp, params.get("compute_dtype"))
    length = int(q.shape[-2])
    grads = {n: xp.zeros(inputs[n].shape, dtype=dtype, device=device_of(q)) for n in ("q", "k", "v")}
    if not calls:
        grads.update({n: xp.zeros(inputs[n].shape, dtype=dtype, device=device_of(q))
                      for n in ("conv_k", "conv_v") if inputs.get(n) is not None})
        return grads
    s, m, r = int(params["segment_length"]), int(params["memory_length"]), int(params["rate"])
    n_c = int(params["compressed_length"])
    count = length // r
    d_out = xp.astype(d_out, dtype)
    d_lse = None if d_lse is None else xp.astype(d_lse, dtype)
    d_slots_k = xp.zeros((*k.shape[:-2], count, k.shape[-1]), dtype=dtype, device=device_of(q))
    d_slots_v = xp.zeros((*v.shape[:-2], count, v.shape[-1]), dtype=dtype, device=device_of(q))
    for call, start in zip(calls, range(0, length, s)):
        stop = min(start + s, length)
        first = max(0, start - m)
        ready = first // r
        oldest = max(0, ready - n_c)
        g = call.backward(d_out[..., start:stop, :], None if d_lse is None else d_lse[..., start:stop])
        n_slots = ready - oldest
        grads["q"] = grads["q"] + _place(xp, g.dq, start, length)
        grads["k"] = grads["k"] + _place(xp, g.dk[..., n_slots:, :], first, length)
        grads["v"] = grads["v"] + _place(xp, g.dv[..., n_slots:, :], first, length)
        d_slots_k = d_slots_k + _place(xp, g.dk[..., :n_slots, :], oldest, count)
        d_slots_v = d_slots_v + _place(xp, g.dv[..., :n_slots, :], oldest, count)
    conv = params.get("compression", "mean") == "conv"
    for name, x, d_slots in (("k", k, d_slots_k), ("v", v, d_slots_v)):
        weights = xp.astype(inputs[f"conv_{name}"], dtype) if conv else None
        dx, d_weights = _compress_vjp(xp, xp.astype(x, dtype), r, weights, d_slots)
        grads[name] = grads[name] + dx
        if conv:
            grads[f"conv_{name}"] = d_weights
    return grads



def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    length = 4 * d["L"] + 3
    shapes = dict(heads=d["H"], kv_heads=d["G"], length=length, key_length=length, dim=d["D"], value_dim=d["E"])
    gqa = qkv(seed, **shapes)
    conv = {"conv_k": random.normal((2, d["D"], d["D"]), seed=(seed, 5), std=0.5),
            "conv_v": random.normal((2, d["E"], d["E"]), seed=(seed, 6), std=0.5)}
    base = {"segment_length": 4, "memory_length": 3, "compressed_length": 3, "rate": 2}
    return [
        Case("mean", gqa, base, seed=seed),
        Case("conv", {**gqa, **conv}, {**base, "compression": "conv"}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    """Four segments (s = m = n_c = min(512, ⌈seq/4⌉)), conv compression at rate 4 (std 1/√(rD) weights)."""
    s = min(512, -(-seq // 4))
    rate = 4
    inputs = {**example_qkv(seq, heads, dim, seed),
              "conv_k": random.normal((rate, dim, dim), seed=(seed, 3), std=(rate * dim) ** -0.5),
              "conv_v": random.normal((rate, dim, dim), seed=(seed, 4), std=(rate * dim) ** -0.5)}
    params = {"segment_length": s, "memory_length": s, "compressed_length": s, "rate": rate, "compression": "conv"}
    return Case("example", inputs, params, seed=seed)


register(Mechanism(
    key="compressive",
    function=compressive_attention,
    family="I. memory, recurrence, hierarchy, routing",
    paper="Rae et al. 2020 (Compressive Transformer), ICLR, §3",
    params={
        "segment_length": "s: queries per segment",
        "memory_length": "m: uncompressed cached positions before each segment",
        "compressed_length": "n_c: compressed slots kept",
        "rate": "r: evicted positions per compressed slot",
        "compression": "'mean' | 'conv' (with conv_k (r, D, D), conv_v (r, E, E))",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    vjp=_vjp,
))
