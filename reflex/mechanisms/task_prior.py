"""CAMTL conditional attention: a block-diagonal, task-conditioned prior added to the scores."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, qkv
from reflex.mechanisms._patterns import mask_and_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._numerics import unbroadcast

__all__ = ["task_prior_attention", "block_diagonal_prior"]


@typed_options()
def block_diagonal_prior(blocks: Any, /, *, gamma: Any = None, beta: Any = None) -> Any:
    """The prior M = ⊕ₙ (Aₙ·γ + β): ``blocks (..., n, b_L, b_S)`` → ``(..., n·b_L, n·b_S)``, 0 off the blocks.

    ``gamma`` and ``beta`` (the FiLM modulation of the task embedding) broadcast against
    ``blocks``; ``None`` means 1 and 0.
    """
    xp = namespace(blocks)
    if blocks.ndim < 3:
        raise ValueError(f"blocks must have shape (..., n, b_L, b_S); got {tuple(blocks.shape)}")
    if gamma is not None:
        blocks = blocks * gamma
    if beta is not None:
        blocks = blocks + beta
    n, bl, bs = (int(s) for s in blocks.shape[-3:])
    eye = xp.reshape(xp.eye(n, dtype=xp.bool, device=device_of(blocks)), (n, 1, n, 1))
    spread = xp.where(eye, xp.expand_dims(blocks, axis=-2), xp.zeros((), dtype=blocks.dtype, device=device_of(blocks)))
    return xp.reshape(spread, (*blocks.shape[:-3], n * bl, n * bs))


@typed_options()
def task_prior_attention(q: Any, k: Any, v: Any, /, *, blocks: Any, gamma: Any = None, beta: Any = None,
                         mask: Any = None, causal: bool | str = False, scale: float | None = None,
                         return_lse: bool = False, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """CAMTL conditional attention: softmax(scale·QKᵀ + block-diagonal task prior) V.

    .. math::

        O = \\mathrm{softmax}\\big(\\mathrm{scale}\\cdot QK^\\top + M(z)\\big) V,\\qquad
        M(z) = \\bigoplus_{n=1}^{N} \\big(A_n\\,\\gamma(z) + \\beta(z)\\big)

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)``; ``blocks`` A of shape
    broadcastable to ``(..., H, N, L/N, S/N)`` (per head, or shared with a head axis of 1 or none):
    block n covers rows ``[n·L/N, (n+1)·L/N)`` and columns ``[n·S/N, (n+1)·S/N)``; entries off the
    diagonal blocks are 0 (the paper's direct sum, not a mask). ``gamma`` γ(z) and ``beta`` β(z) are
    the FiLM outputs for the task embedding z, given explicitly (arrays broadcastable to ``blocks``,
    or ``None`` = 1 and 0); to pass an already conditioned prior, pass it as ``blocks``. L and S must
    be multiples of N. The prior enters the engine as a bias term; ``mask``/``causal``/``scale`` as
    in :func:`reflex.full_attention`.

    Reference: Pilault, Elhattami & Pal 2021, "Conditionally Adaptive Multi-Task Learning:
    Improving Transfer Learning in NLP Using Fewer Parameters & Less Data", ICLR, §2.2 (eq. 3).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    blocks = _kernels.check_array(xp, p.device, p.q.dtype, "blocks", blocks)
    if blocks.ndim < 3:
        raise ValueError(f"blocks must have shape (..., N, L/N, S/N); got {tuple(blocks.shape)}")
    n, bl, bs = (int(s) for s in blocks.shape[-3:])
    if n * bl != p.length or n * bs != p.key_length:
        raise ValueError(f"blocks of shape {tuple(blocks.shape)} tile {n}·{bl} × {n}·{bs} = {n * bl} × {n * bs}; "
                         f"expected (L, S) = ({p.length}, {p.key_length})")
    gamma, beta = (None if a is None else _kernels.check_array(xp, p.device, p.q.dtype, name, a)
                   for name, a in (("gamma", gamma), ("beta", beta)))
    prior = block_diagonal_prior(blocks, gamma=gamma, beta=beta)
    prior = _kernels.check_term(p, "blocks (as a block-diagonal prior)", prior, boolean=False)
    masks, tile_active = mask_and_causal(p, mask, causal)
    return _kernels.softmax_attention(p, scale=_kernels.resolve_scale(scale, p.dim), mask=masks, bias=prior,
                                      tile_active=tile_active, implementation=implementation, return_lse=return_lse)

def _vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, **params: Any) -> dict:
    """VJP of :func:`task_prior_attention` through the engine's backward.

    The prior M enters the engine as an array bias, so ``dM`` is the score cotangent summed over
    the axes M broadcasts along. Back through the direct sum, only the diagonal blocks carry
    gradient: ``d(A_n γ + β) = dM`` on block n; then ``dA = Σ dM_blocks·γ``, ``dγ = Σ dM_blocks·A``,
    ``dβ = Σ dM_blocks`` (each summed over its broadcast axes).
    """
    _, calls = _kernels.run_recorded(task_prior_attention, inputs, params, return_lse=d_lse is not None)
    (call,) = calls
    p = call.p
    xp, dtype = p.xp, p.q.dtype
    g = call.backward(d_out, d_lse)
    blocks = xp.astype(inputs["blocks"], dtype)
    gamma = inputs.get("gamma")
    gamma = None if gamma is None else xp.astype(gamma, dtype)
    n, bl, bs = (int(x) for x in blocks.shape[-3:])
    d_prior = g.bias[0]  # (..., L, S), the prior's shape
    split = xp.reshape(d_prior, (*d_prior.shape[:-2], n, bl, n, bs))
    eye = xp.reshape(xp.eye(n, dtype=xp.bool, device=p.device), (n, 1, n, 1))
    d_mod = xp.sum(xp.where(eye, split, 0.0), axis=-2)  # (..., n, b_L, b_S): the diagonal blocks
    grads = {"q": g.dq, "k": g.dk, "v": g.dv,
             "blocks": unbroadcast(xp, d_mod if gamma is None else d_mod * gamma, tuple(blocks.shape))}
    if gamma is not None:
        grads["gamma"] = unbroadcast(xp, d_mod * blocks, tuple(inputs["gamma"].shape))
    if inputs.get("beta") is not None:
        grads["beta"] = unbroadcast(xp, d_mod, tuple(inputs["beta"].shape))
    return grads



def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    length, n = d["L"], 2
    key_length = 2 * length  # S = 2L ≠ L, both multiples of N
    shapes = dict(heads=d["H"], length=length, key_length=key_length, dim=d["D"], value_dim=d["E"])
    gqa = qkv(seed, kv_heads=d["G"], **shapes)
    blocks = random.normal((2, d["H"], n, length // n, key_length // n), seed=(seed, 3))
    shared = random.normal((n, length // n, key_length // n), seed=(seed, 4))
    film = {"gamma": random.normal((2, 1, 1, 1, 1), seed=(seed, 5)), "beta": random.normal((2, 1, n, 1, 1), seed=(seed, 6))}
    return [
        Case("per_head", {**gqa, "blocks": blocks}, {}, seed=seed),
        Case("shared_film", {**gqa, "blocks": shared, **film}, {}, seed=seed),
        Case("per_head_causal", {**gqa, "blocks": blocks}, {"causal": "bottom_right"}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    inputs = {name: random.normal((1, heads, seq, dim), seed=(seed, i)) for i, name in enumerate("qkv")}
    n = next(b for b in (4, 3, 2, 1) if seq % b == 0)
    inputs["blocks"] = random.normal((1, heads, n, seq // n, seq // n), seed=(seed, 3))
    return Case("example", inputs, {}, seed=seed)


register(Mechanism(
    key="task_prior",
    function=task_prior_attention,
    family="G. prior",
    paper="Pilault, Elhattami & Pal 2021, Conditionally Adaptive Multi-Task Learning (CAMTL), ICLR, §2.2",
    params={"blocks": "A (..., H, N, L/N, S/N): diagonal blocks of the prior", "gamma": "FiLM scale γ(z)",
            "beta": "FiLM shift β(z)", "mask": "as full", "causal": "as full"},
    cases=_cases,
    returns_lse=True,
    example=_example,
    vjp=_vjp,
))
