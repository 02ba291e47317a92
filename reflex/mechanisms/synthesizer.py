"""Synthesizer: attention weights synthesised from each token alone (dense) or learnt outright (random)."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims
from reflex.mechanisms._patterns import mask_and_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._numerics import unbroadcast

__all__ = ["synthesizer_attention"]

VARIANTS = ("dense", "random", "factorized_dense", "factorized_random")
TILINGS = ("outer", "tile")


def _array(xp: Any, dev: Any, name: str, a: Any, ndim: int | None = None) -> Any:
    if a is None:
        raise ValueError(f"{name} is required by this variant")
    if namespace(a) is not xp or device_of(a) != dev:
        raise TypeError(f"{name} must be an array of v's library on v's device")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes; got shape {tuple(a.shape)}")
    return a


def _linear(xp: Any, x: Any, w: Any, b: Any) -> Any:
    """``x (..., L, N)`` @ per-head ``w (H, N, F)`` (+ ``b (H, F)``) → ``(..., H, L, F)``."""
    y = xp.expand_dims(x, axis=-3) @ w
    return y if b is None else y + b[:, None, :]


@typed_options()
def synthesizer_attention(v: Any, /, *, variant: str = "random", x: Any = None, random_matrix: Any = None,
                          r1: Any = None, r2: Any = None, w1: Any = None, b1: Any = None, w2: Any = None,
                          b2: Any = None, w_a: Any = None, w_b: Any = None, tiling: str = "outer",
                          mask: Any = None, causal: bool | str = False, return_lse: bool = False,
                          compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Synthesizer: softmax of synthetic scores B times V, with no query–key dot products.

    .. math::

        O_h = \\mathrm{softmax}(B_h + \\log\\mathrm{mask})\\, V_{g(h)},\\qquad
        B_h = \\begin{cases}
            \\mathrm{relu}(X W_{1,h} + b_{1,h})\\, W_{2,h} + b_{2,h} & \\text{dense} \\\\
            R_h & \\text{random} \\\\
            R_{1,h} R_{2,h}^\\top & \\text{factorized random} \\\\
            H_A(X W_{a,h}) \\odot H_B(X W_{b,h}) & \\text{factorized dense}
        \\end{cases}

    Shapes: ``v (..., G, S, E)`` → ``(..., H, L, E)``, head h using value head ``h // (H/G)``.
    - ``"dense"``: ``x (..., L, N)``, ``w1 (H, N, F)``, ``b1 (H, F)`` (optional), ``w2 (H, F, S)``,
      ``b2 (H, S)`` (optional): each row of B comes from its own token only.
    - ``"random"``: ``random_matrix`` R broadcastable to ``(..., H, L, S)`` with an explicit head axis
      (a learnt or fixed input-independent map).
    - ``"factorized_random"``: ``r1 (H, L, k)``, ``r2 (H, S, k)``.
    - ``"factorized_dense"``: ``x (..., L, N)``, ``w_a (H, N, a)``, ``w_b (H, N, b)`` with a·b = S;
      A = X W_a and B = X W_b are linear (the paper leaves F_A, F_B open; here they are single
      linear maps). ``tiling`` fixes the paper's repeat functions: ``"outer"`` (default) gives
      C[u·b + w] = A[u]·B[w] (H_A repeats each entry b times, H_B tiles B a times, so C is the
      flattened outer product); ``"tile"`` gives C[j] = A[j mod a]·B[j mod b] (both tile).
    The scores enter the engine as a bias with scale 0 (dummy zero queries/keys), so the softmax is
    the engine's; ``mask``/``causal`` as in :func:`reflex.full_attention` (the paper masks the
    synthetic scores causally for decoding). The paper's mixture with dot-product attention is
    ``full_attention(q, k, v, bias=α·B)`` with B from here.

    Reference: Tay et al. 2021, "Synthesizer: Rethinking Self-Attention for Transformer Models",
    ICML, §3.1 (dense, random and factorized variants, eq. 1–4).
    """
    xp = namespace(v)
    dev = device_of(v)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    if tiling not in TILINGS:
        raise ValueError(f"tiling must be one of {', '.join(TILINGS)}; got {tiling!r}")
    if v.ndim < 3:
        raise ValueError(f"v must have shape (..., G, S, E); got {tuple(v.shape)}")
    dtype = _kernels.resolve_dtype(xp, compute_dtype)
    cast = lambda name, a, ndim=None: xp.astype(_array(xp, dev, name, a, ndim), dtype)  # noqa: E731
    optional = lambda name, a, ndim: None if a is None else cast(name, a, ndim)  # noqa: E731
    if variant == "dense":
        hidden = xp.maximum(_linear(xp, cast("x", x), cast("w1", w1, 3), optional("b1", b1, 2)), 0.0)
        scores = hidden @ cast("w2", w2, 3)
        b2 = optional("b2", b2, 2)
        scores = scores if b2 is None else scores + b2[:, None, :]
    elif variant == "random":
        scores = cast("random_matrix", random_matrix)
        if scores.ndim < 3:
            raise ValueError(f"random_matrix must have a head axis, (..., H, L, S); got {tuple(scores.shape)}")
    elif variant == "factorized_random":
        scores = cast("r1", r1, 3) @ xp.matrix_transpose(cast("r2", r2, 3))
    else:
        xs = cast("x", x)
        a_part, b_part = _linear(xp, xs, cast("w_a", w_a, 3), None), _linear(xp, xs, cast("w_b", w_b, 3), None)
        na, nb = int(a_part.shape[-1]), int(b_part.shape[-1])
        if na * nb != int(v.shape[-2]):
            raise ValueError(f"w_a and w_b give a·b = {na}·{nb} = {na * nb}; expected S = {int(v.shape[-2])}")
        if tiling == "outer":
            grid = xp.expand_dims(a_part, axis=-1) * xp.expand_dims(b_part, axis=-2)
        else:
            a_idx = xp.arange(na * nb, dtype=xp.int64, device=dev) % na
            b_idx = xp.arange(na * nb, dtype=xp.int64, device=dev) % nb
            grid = xp.take(a_part, a_idx, axis=-1) * xp.take(b_part, b_idx, axis=-1)
        scores = xp.reshape(grid, (*grid.shape[:-2], na * nb)) if tiling == "outer" else grid
    heads, length, key_length = (int(n) for n in scores.shape[-3:])
    if key_length != int(v.shape[-2]):
        raise ValueError(f"the synthetic scores have {key_length} key columns (shape {tuple(scores.shape)}); v has S = {int(v.shape[-2])}")
    batch = tuple(v.shape[:-3])
    zeros = lambda h, n: xp.zeros((*batch, h, n, 1), dtype=dtype, device=dev)  # noqa: E731
    p = _kernels.prepare(zeros(heads, length), zeros(int(v.shape[-3]), key_length), v, compute_dtype=dtype)
    bias = _kernels.check_term(p, "synthetic scores", scores, boolean=False)
    masks, tile_active = mask_and_causal(p, mask, causal)
    return _kernels.softmax_attention(p, scale=0.0, mask=masks, bias=bias, tile_active=tile_active,
                                      implementation=implementation, return_lse=return_lse)


def _synthesizer_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, variant: str = "random", tiling: str = "outer",
                     mask: Any = None, causal: bool | str = False, compute_dtype: Any = None,
                     implementation: str = "auto") -> dict:
    """VJP of :func:`synthesizer_attention`: ``dv`` and the gradient of every floating array of the variant.

    The softmax map ``P`` of the synthetic scores B gives ``dB = P ∘ (dP − rowsum(P ∘ dP) + dL)``,
    ``dP = dO Vᵀ``, ``dV = Σ_{heads of a value head} Pᵀ dO`` (masked entries and fully masked rows 0).
    Then per variant (sums over every broadcast axis: batch, and L for biases):

    - random: ``dR = dB``;  factorized random: ``dR₁ = dB R₂``, ``dR₂ = dBᵀ R₁``;
    - dense, ``U = X W₁ + b₁``: ``dW₂ = relu(U)ᵀ dB``, ``db₂ = Σ_L dB``, ``dU = (dB W₂ᵀ) ∘ [U > 0]``
      (subgradient 0 at the kink U = 0), ``dW₁ = Xᵀ dU``, ``db₁ = Σ_L dU``, ``dX = Σ_h dU W₁ᵀ``;
    - factorized dense, ``C = H_A(A) ∘ H_B(B)``, ``A = X W_a``, ``B = X W_b``: ``dA[u] = Σ_{j: H_A(j) = u}
      dC_j H_B(B)_j`` (and likewise ``dB``), ``dW_a = Xᵀ dA``, ``dW_b = Xᵀ dB``, ``dX = Σ_h dA W_aᵀ + dB W_bᵀ``.

    The map P is materialised (L × S per head), as the synthetic scores already are.
    """
    from reflex.mechanisms import _grad

    v = inputs["v"]
    xp = namespace(v)
    dev = device_of(v)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    if tiling not in TILINGS:
        raise ValueError(f"tiling must be one of {', '.join(TILINGS)}; got {tiling!r}")
    dtype = _kernels.resolve_dtype(xp, compute_dtype)
    get = lambda name: None if inputs.get(name) is None else xp.astype(_array(xp, dev, name, inputs[name]), dtype)  # noqa: E731
    t = xp.matrix_transpose
    if variant == "dense":
        x, w1, b1, w2, b2 = (get(n) for n in ("x", "w1", "b1", "w2", "b2"))
        pre = _linear(xp, x, w1, b1)
        hidden = xp.maximum(pre, 0.0)
        scores = hidden @ w2 if b2 is None else hidden @ w2 + b2[:, None, :]
    elif variant == "random":
        scores = get("random_matrix")
    elif variant == "factorized_random":
        r1, r2 = get("r1"), get("r2")
        scores = r1 @ t(r2)
    else:
        x, w_a, w_b = get("x"), get("w_a"), get("w_b")
        a_part, b_part = _linear(xp, x, w_a, None), _linear(xp, x, w_b, None)
        na, nb = int(a_part.shape[-1]), int(b_part.shape[-1])
        if tiling == "outer":
            a_wide = xp.reshape(xp.broadcast_to(a_part[..., :, None], (*a_part.shape, nb)), (*a_part.shape[:-1], na * nb))
            b_wide = xp.reshape(xp.broadcast_to(b_part[..., None, :], (*b_part.shape[:-1], na, nb)), (*b_part.shape[:-1], na * nb))
        else:
            a_wide = xp.take(a_part, xp.arange(na * nb, dtype=xp.int64, device=dev) % na, axis=-1)
            b_wide = xp.take(b_part, xp.arange(na * nb, dtype=xp.int64, device=dev) % nb, axis=-1)
        scores = a_wide * b_wide
    heads, length, key_length = (int(n) for n in scores.shape[-3:])
    batch = tuple(v.shape[:-3])
    zeros = lambda h, n: xp.zeros((*batch, h, n, 1), dtype=dtype, device=dev)  # noqa: E731
    p = _kernels.prepare(zeros(heads, length), zeros(int(v.shape[-3]), key_length), v, compute_dtype=dtype)
    bias = _kernels.check_term(p, "synthetic scores", scores, boolean=False)
    masks, _ = mask_and_causal(p, mask, causal)
    prob = _kernels.weights(p, scale=0.0, mask=masks, bias=bias)
    d_scores, d_v = _grad.attention_map_vjp(p, prob, d_out, d_lse)
    grads = {"v": d_v}
    if variant == "random":
        grads["random_matrix"] = unbroadcast(xp, d_scores, tuple(scores.shape))
        return grads
    d_scores = unbroadcast(xp, d_scores, tuple(scores.shape))  # (..., H, L, S) → the scores' own shape
    if variant == "factorized_random":
        return {**grads, "r1": d_scores @ r2, "r2": t(d_scores) @ r1}

    def through_linear(name: str, d_y: Any, w: Any) -> Any:
        """``y = x @ w[h]`` per head: ``dw = Σ_batch xᵀ dy``; returns ``dx`` summed over heads."""
        grads[name] = unbroadcast(xp, t(xp.expand_dims(x, axis=-3)) @ d_y, tuple(w.shape))
        return xp.sum(d_y @ t(w), axis=-3)

    if variant == "dense":
        grads["w2"] = unbroadcast(xp, t(hidden) @ d_scores, tuple(w2.shape))
        if b2 is not None:
            grads["b2"] = unbroadcast(xp, xp.sum(d_scores, axis=-2), tuple(b2.shape))
        d_pre = xp.where(pre > 0, d_scores @ t(w2), 0.0)
        if b1 is not None:
            grads["b1"] = unbroadcast(xp, xp.sum(d_pre, axis=-2), tuple(b1.shape))
        grads["x"] = through_linear("w1", d_pre, w1)
        return grads
    d_a_wide, d_b_wide = d_scores * b_wide, d_scores * a_wide
    if tiling == "outer":  # C[u·b + w] = A[u]·B[w]
        d_a = xp.sum(xp.reshape(d_a_wide, (*d_a_wide.shape[:-1], na, nb)), axis=-1)
        d_b = xp.sum(xp.reshape(d_b_wide, (*d_b_wide.shape[:-1], na, nb)), axis=-2)
    else:  # C[j] = A[j mod a]·B[j mod b]: j = r·a + u, and j = r·b + w
        d_a = xp.sum(xp.reshape(d_a_wide, (*d_a_wide.shape[:-1], nb, na)), axis=-2)
        d_b = xp.sum(xp.reshape(d_b_wide, (*d_b_wide.shape[:-1], na, nb)), axis=-2)
    grads["x"] = through_linear("w_a", d_a, w_a) + through_linear("w_b", d_b, w_b)
    return grads


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    h, g, length, e, n, f = d["H"], d["G"], d["L"], d["E"], 2 * d["D"], d["D"]
    key_length = length  # the synthetic scores are a (L, S) map; S = L here, as in the paper's self-attention
    v = random.normal((2, g, key_length, e), seed=(seed, 0))
    x = random.normal((2, length, n), seed=(seed, 1))
    dense = {"x": x, "w1": random.normal((h, n, f), seed=(seed, 2), std=n ** -0.5), "b1": random.normal((h, f), seed=(seed, 3)),
             "w2": random.normal((h, f, key_length), seed=(seed, 4), std=f ** -0.5), "b2": random.normal((h, key_length), seed=(seed, 5))}
    rank = 2
    return [
        Case("dense", {"v": v, **dense}, {"variant": "dense"}, positional=("v",), seed=seed),
        Case("random_causal", {"v": v, "random_matrix": random.normal((h, length, key_length), seed=(seed, 6))},
             {"variant": "random", "causal": True}, positional=("v",), seed=seed),
        Case("factorized_random", {"v": v, "r1": random.normal((h, length, rank), seed=(seed, 7)),
                                   "r2": random.normal((h, key_length, rank), seed=(seed, 8))},
             {"variant": "factorized_random"}, positional=("v",), seed=seed),
        Case("factorized_dense", {"v": v, "x": x, "w_a": random.normal((h, n, 2), seed=(seed, 9)),
                                  "w_b": random.normal((h, n, key_length // 2), seed=(seed, 10))},
             {"variant": "factorized_dense"}, positional=("v",), seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", {"v": random.normal((1, heads, seq, dim), seed=(seed, 0)),
                            "random_matrix": random.normal((heads, seq, seq), seed=(seed, 1))},
                {"variant": "random"}, positional=("v",), seed=seed)


register(Mechanism(
    key="synthesizer",
    function=synthesizer_attention,
    family="G. prior",
    paper="Tay et al. 2021, Synthesizer: Rethinking Self-Attention for Transformer Models, ICML, §3.1",
    params={"variant": "'dense' | 'random' | 'factorized_dense' | 'factorized_random'",
            "x": "(..., L, N) token inputs (dense variants)", "random_matrix": "R (..., H, L, S)",
            "r1, r2": "(H, L, k), (H, S, k) factors", "w1, b1, w2, b2": "dense synthesizer weights",
            "w_a, w_b": "factorized dense weights, a*b = S", "tiling": "'outer' (default) | 'tile'",
            "mask": "as full", "causal": "as full"},
    cases=_cases,
    returns_lse=True,
    example=_example,
    vjp=_synthesizer_vjp,
))
