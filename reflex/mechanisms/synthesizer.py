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
))
