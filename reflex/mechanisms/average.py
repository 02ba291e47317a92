"""Average attention network: a cumulative mean over positions replaces self-attention, then a gate."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms._cases import dims
from reflex.mechanisms._kernels import resolve_dtype
from reflex.registry import Case, Mechanism, register

__all__ = ["average_attention"]

IMPLEMENTATIONS = ("auto", "parallel", "recurrent")


def _sigmoid(xp: Any, z: Any) -> Any:
    return 1.0 / (1.0 + xp.exp(-z))


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
))
