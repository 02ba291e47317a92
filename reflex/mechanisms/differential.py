"""Differential attention (Ye et al. 2024, Differential Transformer): the difference of two softmax maps."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, qkv
from reflex.mechanisms._patterns import mask_and_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["differential_attention", "differential_lambda_init"]


@typed_options()
def differential_lambda_init(depth: int) -> float:
    """λ_init = 0.8 − 0.6·exp(−0.3·depth) for the layer at index ``depth`` (0-based, as the paper's code)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an int >= 0 (the layer index); got {depth!r}")
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


def _check_heads(q: Any, k: Any, v: Any) -> tuple[int, int]:
    """``(H, G)``: pairs of query heads and value heads, from q (…, 2H, L, D), k (…, 2G, S, D), v (…, G, S, E)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 3:
            raise ValueError(f"{name} must have shape (..., heads, length, dim) with at least 3 axes; got shape {tuple(x.shape)}")
    q_heads, k_heads, v_heads = int(q.shape[-3]), int(k.shape[-3]), int(v.shape[-3])
    if q_heads % 2:
        raise ValueError(f"q must have 2H heads (two query heads per output head); got {q_heads}")
    if k_heads != 2 * v_heads:
        raise ValueError(f"k must have 2G heads for v's G = {v_heads} heads, i.e. {2 * v_heads}; got {k_heads}")
    if v_heads == 0 or (q_heads // 2) % v_heads:
        raise ValueError(f"v has {v_heads} heads; q has H = {q_heads // 2} head pairs, which is not a multiple")
    return q_heads // 2, v_heads


def _lambda_vectors(xp: Any, device: Any, dtype: Any, dim: int, vectors: dict[str, Any]) -> dict[str, Any]:
    """The four ``(D,)`` λ vectors checked and cast to the compute dtype."""
    checked = {}
    for name, x in vectors.items():
        x = _kernels.check_array(xp, device, dtype, name, x)
        if tuple(x.shape) != (dim,):
            raise ValueError(f"{name} must have shape (D,) = ({dim},); got {tuple(x.shape)}")
        checked[name] = x
    return checked


def _resolve_lambda_init(depth: Any, lambda_init: Any) -> float:
    if (depth is None) == (lambda_init is None):
        raise ValueError("pass exactly one of depth (the layer index) and lambda_init; "
                         f"got depth={depth!r}, lambda_init={lambda_init!r}")
    if depth is not None:
        return differential_lambda_init(depth)
    if isinstance(lambda_init, bool) or not isinstance(lambda_init, (int, float)) or not math.isfinite(lambda_init):
        raise ValueError(f"lambda_init must be a finite real number; got {lambda_init!r}")
    return float(lambda_init)


@typed_options()
def differential_attention(q: Any, k: Any, v: Any, /, *, lambda_q1: Any, lambda_k1: Any, lambda_q2: Any,
                           lambda_k2: Any, depth: int | None = None, lambda_init: float | None = None,
                           norm_weight: Any = None, eps: float = 1e-5, mask: Any = None, causal: bool | str = False,
                           scale: float | None = None, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Differential attention: the difference of two softmax maps, then a per-head RMSNorm.

    .. math::

        A_h = \\mathrm{softmax}(\\tau Q_{2h} K_{g(2h)}^\\top + M)
              - \\lambda\\, \\mathrm{softmax}(\\tau Q_{2h+1} K_{g(2h+1)}^\\top + M),

        O_h = (1 - \\lambda_{\\mathrm{init}})\\cdot
              \\frac{A_h V_{h // (H/G)}}{\\sqrt{\\mathrm{mean}_E\\big((A_h V)^2\\big) + \\epsilon}} \\circ w,

        \\lambda = e^{\\lambda_{q1}\\cdot\\lambda_{k1}} - e^{\\lambda_{q2}\\cdot\\lambda_{k2}} + \\lambda_{\\mathrm{init}},
        \\qquad \\lambda_{\\mathrm{init}} = 0.8 - 0.6\\, e^{-0.3\\,\\mathrm{depth}}.

    Shapes: ``q (..., 2H, L, D)``, ``k (..., 2G, S, D)``, ``v (..., G, S, E)`` → ``out (..., H, L, E)``.
    Query heads ``2h`` and ``2h + 1`` form output head ``h`` (the paper's code splits each head of
    width 2D into two of width D); value heads have the full width E (2D in the paper).

    GQA as the paper's code (``repeat_kv`` after the 2× split): query head ``j`` of the 2H reads key
    head ``g(j) = j // (H/G)`` of the 2G, and pair ``h`` reads value head ``h // (H/G)``. With an even
    ``H/G`` both maps of a pair read the same key head.

    Args:
        lambda_q1, lambda_k1, lambda_q2, lambda_k2: ``(D,)`` re-parameterisation vectors of λ, one
            λ for all heads (one layer).
        depth: the layer index (0-based), giving λ_init = 0.8 − 0.6·e^{−0.3·depth}; or pass
            ``lambda_init`` directly (exactly one of the two).
        norm_weight: ``(E,)`` RMSNorm weight w, one for all heads; default ones.
        eps: RMSNorm ε (1e-5 in the paper's code), > 0 (a fully masked row then outputs 0).
        mask: boolean, True = attend, broadcastable to ``(..., 2H, L, S)`` (per query head of the 2H),
            applied to both maps.
        causal: ``False``; ``True``/``"top_left"`` (j ≤ i); ``"bottom_right"`` (j ≤ i + S − L). The
            paper's code masks bottom-right (``triu(−∞, 1 + S − L)``) and always has S = L, where the
            two coincide.
        scale: τ, default 1/√D (``head_dim ** -0.5`` in the paper's code, D the split width).
        compute_dtype, implementation: as :func:`reflex.full_attention` (both maps go through the
            engine: ``"tiled"`` never materialises them).

    Conventions: both maps are max-shifted softmaxes in the compute dtype (the paper's code runs them
    in float32, ``F.softmax(..., dtype=torch.float32)``); (A₁ − λA₂)V is computed as A₁V − λ·A₂V.
    A fully masked row gives A_h V = 0 and output 0. Rotary embeddings (interleaved in the paper's
    code) are the caller's: apply :func:`reflex.apply_rope` with ``convention="interleaved"`` to q and
    k first. No lse is returned (the output is not one softmax).

    Raises ``ValueError`` for head counts that do not pair up (odd 2H, k heads ≠ 2·v heads, H not a
    multiple of G), λ vectors not of shape ``(D,)``, ``norm_weight`` not ``(E,)``, ``eps <= 0``, or
    ``depth``/``lambda_init`` both or neither given.

    Reference: Ye et al. 2024, "Differential Transformer", arXiv:2410.05258, §2.1 (eq. 1–3: λ's
    re-parameterisation and λ_init) and §2.1 "Multi-head differential attention" (GroupNorm →
    headwise RMSNorm, scaled by 1 − λ_init).
    """
    f = _Forward(q, k, v, {"lambda_q1": lambda_q1, "lambda_k1": lambda_k1, "lambda_q2": lambda_q2,
                           "lambda_k2": lambda_k2}, depth=depth, lambda_init=lambda_init, norm_weight=norm_weight,
                 eps=eps, mask=mask, causal=causal, scale=scale, compute_dtype=compute_dtype)
    both = _kernels.softmax_attention(f.p, scale=f.scale, mask=f.masks, tile_active=f.tile_active,
                                      implementation=implementation)
    return f.finish(both)[0]


class _Forward:
    """Validated inputs of :func:`differential_attention` and the steps after the engine call."""

    def __init__(self, q: Any, k: Any, v: Any, lambdas: dict[str, Any], *, depth: Any, lambda_init: Any,
                 norm_weight: Any, eps: Any, mask: Any, causal: Any, scale: Any, compute_dtype: Any) -> None:
        self.heads, _ = _check_heads(q, k, v)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
            raise ValueError(f"eps must be a positive finite number; got {eps!r}")
        self.eps = float(eps)
        self.init = _resolve_lambda_init(depth, lambda_init)
        xp = self.xp = namespace(q, k, v)
        # v's heads repeated pair-wise to 2G: query head j reads head j // (H/G) of them, i.e. v head
        # (j // (H/G)) // 2 = (j // 2) // (H/G), the value head of its pair
        v_pairs = xp.reshape(xp.stack([v, v], axis=-3), (*v.shape[:-3], 2 * int(v.shape[-3]), *v.shape[-2:]))
        p = self.p = _kernels.prepare(q, k, v_pairs, compute_dtype=compute_dtype)
        self.lambdas = _lambda_vectors(xp, p.device, p.q.dtype, p.dim, lambdas)
        self.first = xp.exp(xp.sum(self.lambdas["lambda_q1"] * self.lambdas["lambda_k1"]))
        self.second = xp.exp(xp.sum(self.lambdas["lambda_q2"] * self.lambdas["lambda_k2"]))
        self.lam = self.first - self.second + self.init
        if norm_weight is None:
            self.weight = xp.ones((p.value_dim,), dtype=p.q.dtype, device=p.device)
        else:
            self.weight = _kernels.check_array(xp, p.device, p.q.dtype, "norm_weight", norm_weight)
            if tuple(self.weight.shape) != (p.value_dim,):
                raise ValueError(f"norm_weight must have shape (E,) = ({p.value_dim},); got {tuple(self.weight.shape)}")
        self.masks, self.tile_active = mask_and_causal(p, mask, causal)
        self.scale = _kernels.resolve_scale(scale, p.dim)

    def finish(self, both: Any) -> tuple[Any, Any, Any, Any]:
        """``(out, normalised, rms, second map's output)`` from the engine output ``(..., 2H, L, E)``."""
        xp, p = self.xp, self.p
        both = xp.reshape(both, (*p.batch, self.heads, 2, p.length, p.value_dim))
        diff = both[..., 0, :, :] - self.lam * both[..., 1, :, :]  # (A₁ − λA₂)V
        rms = xp.sqrt(xp.mean(diff * diff, axis=-1, keepdims=True) + self.eps)
        normalised = diff / rms
        return normalised * self.weight * (1.0 - self.init), normalised, rms, both[..., 1, :, :]


def _differential_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, depth: Any = None, lambda_init: Any = None,
                      eps: float = 1e-5, causal: Any = False, scale: Any = None, compute_dtype: Any = None,
                      implementation: str = "auto") -> dict:
    """VJP of :func:`differential_attention`.

    With ``c = 1 − λ_init``, ``n = x / r`` (``x = O₁ − λO₂``, ``r = √(mean(x²) + ε)``), ``O_m = A_m V``:
    ``dn = c·w∘dOut``, ``dw = c·Σ dOut∘n``; ``dx = (dn − n·mean(dn∘n)) / r``; ``dO₁ = dx``,
    ``dO₂ = −λ·dx``, ``dλ = −Σ dx∘O₂``; ``d(λ_q1·λ_k1) = dλ·e^{λ_q1·λ_k1}``,
    ``d(λ_q2·λ_k2) = −dλ·e^{λ_q2·λ_k2}`` (so ``dλ_q1 = d(λ_q1·λ_k1)·λ_k1``, …); dq, dk and dv of the
    two maps through the engine's backward (dense, or FA2 Alg. 2 tiled), dv summed over the two
    copies of each value head.
    """
    from reflex.mechanisms import _grad

    names = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
    f = _Forward(inputs["q"], inputs["k"], inputs["v"], {n: inputs[n] for n in names}, depth=depth,
                 lambda_init=lambda_init, norm_weight=inputs.get("norm_weight"), eps=eps, mask=inputs.get("mask"),
                 causal=causal, scale=scale, compute_dtype=compute_dtype)
    xp, p = f.xp, f.p
    both = _kernels.softmax_attention(p, scale=f.scale, mask=f.masks, tile_active=f.tile_active,
                                      implementation=implementation)
    _, normalised, rms, second = f.finish(both)
    d_out = xp.astype(d_out, p.q.dtype)
    c = 1.0 - f.init
    d_norm = d_out * f.weight * c
    d_weight = xp.sum(xp.reshape(d_out * normalised * c, (-1, p.value_dim)), axis=0)
    d_diff = (d_norm - normalised * xp.mean(d_norm * normalised, axis=-1, keepdims=True)) / rms
    d_lambda = -xp.sum(d_diff * second)
    d_both = xp.reshape(xp.stack([d_diff, -f.lam * d_diff], axis=-3), (*p.batch, 2 * f.heads, p.length, p.value_dim))
    grads = _grad.softmax_attention_vjp(p, d_both, None, scale=f.scale, mask=f.masks, tile_active=f.tile_active,
                                        implementation=implementation)
    v_heads = p.kv_heads // 2
    d_v = xp.sum(xp.reshape(grads.dv, (*p.batch, v_heads, 2, p.key_length, p.value_dim)), axis=-3)
    d_first, d_second = d_lambda * f.first, -d_lambda * f.second
    lam = f.lambdas
    result = {"q": grads.dq, "k": grads.dk, "v": d_v,
              "lambda_q1": d_first * lam["lambda_k1"], "lambda_k1": d_first * lam["lambda_q1"],
              "lambda_q2": d_second * lam["lambda_k2"], "lambda_k2": d_second * lam["lambda_q2"]}
    if inputs.get("norm_weight") is not None:
        result["norm_weight"] = d_weight
    return result


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(length=d["L"], key_length=d["S"], dim=d["D"], value_dim=2 * d["D"])
    mha = qkv(seed, heads=2 * d["H"], kv_heads=2 * d["H"], **shapes)
    mha["v"] = random.normal((2, d["H"], d["S"], 2 * d["D"]), seed=(seed, 2))
    gqa = qkv(seed, heads=2 * d["H"], kv_heads=2 * d["G"], **shapes)
    gqa["v"] = random.normal((2, d["G"], d["S"], 2 * d["D"]), seed=(seed, 2))
    lambdas = {name: 0.1 * random.normal((d["D"],), seed=(seed, 3 + i))
               for i, name in enumerate(("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"))}
    weight = {"norm_weight": 1.0 + 0.1 * random.normal((2 * d["D"],), seed=(seed, 7))}
    square = qkv(seed, heads=2 * d["H"], kv_heads=2 * d["G"], **{**shapes, "key_length": d["L"]})
    square["v"] = random.normal((2, d["G"], d["L"], 2 * d["D"]), seed=(seed, 2))
    return [
        Case("mha", {**mha, **lambdas}, {"depth": 0}, seed=seed),
        Case("gqa", {**gqa, **lambdas, **weight}, {"depth": 3}, seed=seed),
        Case("causal_square", {**square, **lambdas, **weight}, {"depth": 11, "causal": "bottom_right"}, seed=seed),
        Case("causal_bottom_right", {**gqa, **lambdas}, {"lambda_init": 0.5, "causal": "bottom_right"}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    inputs = qkv(seed, batch=(1,), heads=2 * heads, kv_heads=2 * heads, length=seq, key_length=seq, dim=dim, value_dim=dim)
    inputs["v"] = random.normal((1, heads, seq, 2 * dim), seed=(seed, 2))
    for i, name in enumerate(("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")):
        inputs[name] = 0.1 * random.normal((dim,), seed=(seed, 3 + i))
    return Case("example", inputs, {"depth": 1, "causal": True}, seed=seed)


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """The dense-kernel path of :func:`differential_attention`."""
    return differential_attention(q, k, v, **{**params, "implementation": "dense"})


register(Mechanism(
    key="differential",
    function=differential_attention,
    family="J. multi-head variants",
    paper="Ye et al. 2024, Differential Transformer (arXiv:2410.05258), §2.1",
    params={
        "lambda_q1, lambda_k1, lambda_q2, lambda_k2": "(D,) vectors: lambda = e^(q1.k1) - e^(q2.k2) + lambda_init",
        "depth": "layer index: lambda_init = 0.8 - 0.6 exp(-0.3 depth) (or lambda_init directly)",
        "norm_weight": "(E,) per-head RMSNorm weight, default ones",
        "eps": "RMSNorm epsilon, default 1e-5",
        "mask": "boolean (..., 2H, L, S)-broadcastable, True = attend, both maps",
        "causal": "False | True | 'top_left' | 'bottom_right' (the paper's code: bottom_right, S = L)",
        "scale": "score scale, default 1/sqrt(D)",
    },
    cases=_cases,
    reference=_reference,
    example=_example,
    vjp=_differential_vjp,
))
