"""Average attention network: a cumulative mean over positions replaces self-attention, then a gate."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms._cases import dims
from reflex.mechanisms._kernels import resolve_dtype
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import Causal, typed_options

__all__ = ["average_attention"]

IMPLEMENTATIONS = ("auto", "parallel", "recurrent")


def _sigmoid(xp: Any, z: Any) -> Any:
    return 1.0 / (1.0 + xp.exp(-z))


@typed_options(causal=Causal(top_left_only=True))
def average_attention(x: Any, w_gate: Any, /, *, b_gate: Any = None, w_ffn_in: Any = None, b_ffn_in: Any = None,
                      w_ffn_out: Any = None, b_ffn_out: Any = None, causal: bool = True, return_average: bool = False,
                      compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Average attention: cumulative average of the inputs, optional FFN, then an input/forget gate.

    .. math::

        \\bar y_j = \\frac{1}{j}\\sum_{k=1}^{j} y_k,\\qquad g_j = \\mathrm{FFN}(\\bar y_j),\\qquad
        [\\,i_j; f_j\\,] = \\sigma\\big([\\,y_j; g_j\\,]\\, W + b\\big),\\qquad
        \\tilde h_j = i_j \\odot y_j + f_j \\odot g_j

    Takes ``x`` and weights, not q, k, v. Shapes: ``x`` Y ``(..., L, N)``, ``w_gate`` W
    ``(2N, 2N)`` acting on the right of ``[y; g]``; its first N output columns are the input gate i,
    the last N the forget gate f; ``b_gate (2N,)``. FFN(z) = relu(z W_in + b_in) W_out + b_out with
    ``w_ffn_in (N, F)``, ``w_ffn_out (F, N)`` (both or neither; neither = identity, g = ȳ) →
    ``out (..., L, N)``; with ``return_average`` also ȳ ``(..., L, N)``. ``causal=False`` averages
    over all L positions (the encoder use). The residual connection and layer norm that follow in
    the paper are left to the caller.

    ``implementation``: ``"parallel"`` (``"auto"``: the default; cumulative sum divided by the position, the paper's masked
    matrix form) or ``"recurrent"`` (the decoding form g̃_j = g̃_{j−1} + y_j, ȳ_j = g̃_j / j, one
    position at a time); they agree to round-off.

    Reference: Zhang, Xiong & Su 2018, "Accelerating Neural Transformer via an Average Attention
    Network", ACL, §3 (eq. 1–5).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}")
    arrays = [a for a in (x, w_gate, b_gate, w_ffn_in, b_ffn_in, w_ffn_out, b_ffn_out) if a is not None]
    xp = namespace(*arrays)
    dev = device_of(x)
    for a in arrays:
        if device_of(a) != dev:
            raise ValueError(f"every array must be on x's device {dev}; got one on {device_of(a)}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., L, N); got {tuple(x.shape)}")
    dtype = resolve_dtype(xp, compute_dtype)
    length, width = int(x.shape[-2]), int(x.shape[-1])
    if tuple(w_gate.shape) != (2 * width, 2 * width):
        raise ValueError(f"w_gate must have shape (2N, 2N) = {(2 * width, 2 * width)}; got {tuple(w_gate.shape)}")
    if b_gate is not None and tuple(b_gate.shape) != (2 * width,):
        raise ValueError(f"b_gate must have shape ({2 * width},); got {tuple(b_gate.shape)}")
    if (w_ffn_in is None) != (w_ffn_out is None):
        raise ValueError("pass both w_ffn_in and w_ffn_out, or neither (identity FFN)")
    y = xp.astype(x, dtype)
    if not causal:
        mean = xp.mean(y, axis=-2, keepdims=True)
        average = xp.broadcast_to(mean, y.shape)
    elif implementation in ("auto", "parallel"):
        counts = xp.reshape(xp.arange(1, length + 1, dtype=dtype, device=dev), (length, 1))
        average = xp.cumulative_sum(y, axis=-2) / counts
    else:
        running = xp.zeros((*y.shape[:-2], width), dtype=dtype, device=dev)
        steps = []
        for j in range(length):
            running = running + y[..., j, :]
            steps.append(running / float(j + 1))
        average = xp.stack(steps, axis=-2) if steps else xp.zeros(y.shape, dtype=dtype, device=dev)
    g = average
    if w_ffn_in is not None:
        hidden = g @ xp.astype(w_ffn_in, dtype)
        hidden = xp.maximum(hidden if b_ffn_in is None else hidden + xp.astype(b_ffn_in, dtype), 0.0)
        g = hidden @ xp.astype(w_ffn_out, dtype)
        g = g if b_ffn_out is None else g + xp.astype(b_ffn_out, dtype)
    logits = xp.concat([y, g], axis=-1) @ xp.astype(w_gate, dtype)
    if b_gate is not None:
        logits = logits + xp.astype(b_gate, dtype)
    gates = _sigmoid(xp, logits)
    out = gates[..., :width] * y + gates[..., width:] * g
    return (out, average) if return_average else out


def _average_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, causal: bool = True, return_average: bool = False,
                 compute_dtype: Any = None, implementation: str = "auto") -> dict:
    """VJP of :func:`average_attention` (of ``out``): ``dx``, ``dw_gate`` and every given bias/FFN weight.

    With ``z = [y; g]``, ``[i; f] = σ(zW + b)``, ``h = i∘y + f∘g``:
    ``d(zW + b) = [dh∘y; dh∘g] ∘ σ'``, ``dW = Σ zᵀ d(zW + b)``, ``db = Σ d(zW + b)``,
    ``dy = dh∘i + (d(zW + b) Wᵀ)_{:N}``, ``dg = dh∘f + (d(zW + b) Wᵀ)_{N:}``; FFN
    ``g = relu(ȳW_in + b_in)W_out + b_out`` back to ``dȳ`` (subgradient 0 at the ReLU kink); the
    cumulative average ``ȳ_j = (1/j)Σ_{k≤j} y_k`` gives ``dy_k += Σ_{j≥k} dȳ_j / j``, a reversed
    prefix sum (``"recurrent"``: one position at a time, from the last; non-causal: ``Σ_j dȳ_j / L``).
    Sums run over batch and positions. ``return_average=True`` is refused: the VJP differentiates ``out``.
    """
    if return_average:
        raise ValueError("the VJP differentiates out only; call it with return_average=False")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}")
    names = ("b_gate", "w_ffn_in", "b_ffn_in", "w_ffn_out", "b_ffn_out")
    x, w_gate = inputs["x"], inputs["w_gate"]
    xp = namespace(x, w_gate, *(inputs[n] for n in names if inputs.get(n) is not None))
    dev = device_of(x)
    dtype = resolve_dtype(xp, compute_dtype)
    cast = {n: xp.astype(a, dtype) for n, a in inputs.items() if a is not None}
    y = cast["x"]
    length, width = int(y.shape[-2]), int(y.shape[-1])
    counts = xp.reshape(xp.arange(1, length + 1, dtype=dtype, device=dev), (length, 1))
    average = xp.broadcast_to(xp.mean(y, axis=-2, keepdims=True), y.shape) if not causal \
        else xp.cumulative_sum(y, axis=-2) / counts
    g = average
    if "w_ffn_in" in cast:
        pre = g @ cast["w_ffn_in"] + cast["b_ffn_in"] if "b_ffn_in" in cast else g @ cast["w_ffn_in"]
        hidden = xp.maximum(pre, 0.0)
        g = hidden @ cast["w_ffn_out"]
        g = g + cast["b_ffn_out"] if "b_ffn_out" in cast else g
    z = xp.concat([y, g], axis=-1)
    logits = z @ cast["w_gate"]
    gates = _sigmoid(xp, logits + cast["b_gate"] if "b_gate" in cast else logits)
    d_h = xp.astype(d_out, dtype)
    d_logits = xp.concat([d_h * y, d_h * g], axis=-1) * gates * (1.0 - gates)
    flat = lambda a: xp.reshape(a, (-1, int(a.shape[-1])))  # noqa: E731  (rows over batch and positions)
    grads = {"w_gate": xp.matrix_transpose(flat(z)) @ flat(d_logits)}
    if "b_gate" in cast:
        grads["b_gate"] = xp.sum(flat(d_logits), axis=0)
    d_z = d_logits @ xp.matrix_transpose(cast["w_gate"])
    d_y = d_h * gates[..., :width] + d_z[..., :width]
    d_g = d_h * gates[..., width:] + d_z[..., width:]
    if "w_ffn_in" in cast:
        grads["w_ffn_out"] = xp.matrix_transpose(flat(hidden)) @ flat(d_g)
        if "b_ffn_out" in cast:
            grads["b_ffn_out"] = xp.sum(flat(d_g), axis=0)
        d_pre = xp.where(pre > 0, d_g @ xp.matrix_transpose(cast["w_ffn_out"]), 0.0)
        grads["w_ffn_in"] = xp.matrix_transpose(flat(average)) @ flat(d_pre)
        if "b_ffn_in" in cast:
            grads["b_ffn_in"] = xp.sum(flat(d_pre), axis=0)
        d_g = d_pre @ xp.matrix_transpose(cast["w_ffn_in"])
    if not causal:
        d_y = d_y + xp.sum(d_g, axis=-2, keepdims=True) / length
    elif implementation == "recurrent":
        running = xp.zeros((*y.shape[:-2], width), dtype=dtype, device=dev)
        steps = []
        for j in reversed(range(length)):
            running = running + d_g[..., j, :] / float(j + 1)
            steps.append(running)
        d_y = d_y + (xp.stack(steps[::-1], axis=-2) if steps else xp.zeros(y.shape, dtype=dtype, device=dev))
    else:
        scaled = d_g / counts
        d_y = d_y + xp.flip(xp.cumulative_sum(xp.flip(scaled, axis=-2), axis=-2), axis=-2)
    grads["x"] = d_y
    return grads


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    n, f = 2 * d["D"], 3 * d["D"]
    x = random.normal((2, d["L"], n), seed=(seed, 0))
    gate = {"w_gate": random.normal((2 * n, 2 * n), seed=(seed, 1), std=(2 * n) ** -0.5),
            "b_gate": random.normal((2 * n,), seed=(seed, 2))}
    ffn = {"w_ffn_in": random.normal((n, f), seed=(seed, 3), std=n ** -0.5), "b_ffn_in": random.normal((f,), seed=(seed, 4)),
           "w_ffn_out": random.normal((f, n), seed=(seed, 5), std=f ** -0.5), "b_ffn_out": random.normal((n,), seed=(seed, 6))}
    positional = ("x", "w_gate")
    return [
        Case("causal", {"x": x, **gate}, {}, positional=positional, seed=seed),
        Case("causal_ffn", {"x": x, **gate, **ffn}, {}, positional=positional, seed=seed),
        Case("recurrent", {"x": x, **gate, **ffn}, {"implementation": "recurrent"}, positional=positional, seed=seed),
        Case("encoder", {"x": x, **gate}, {"causal": False}, positional=positional, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    n = heads * dim
    return Case("example", {"x": random.normal((1, seq, n), seed=(seed, 0)),
                            "w_gate": random.normal((2 * n, 2 * n), seed=(seed, 1), std=(2 * n) ** -0.5)},
                {}, positional=("x", "w_gate"), seed=seed)


register(Mechanism(
    key="average",
    function=average_attention,
    family="G. prior",
    paper="Zhang, Xiong & Su 2018, Accelerating Neural Transformer via an Average Attention Network, ACL, §3",
    params={"w_gate": "W (2N, 2N): [y; g] -> [input gate; forget gate]", "b_gate": "(2N,)",
            "w_ffn_in, b_ffn_in, w_ffn_out, b_ffn_out": "optional FFN on the average (relu)",
            "causal": "cumulative average (default) or mean over all positions",
            "implementation": "'auto' = 'parallel' | 'recurrent'", "return_average": "also return the average"},
    cases=_cases,
    row_separable=False,
    example=_example,
    vjp=_average_vjp,
))
