"""FlexAttention: softmax attention with a user ``score_mod`` and ``mask_mod``, PyTorch's semantics on the engine."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, qkv
from reflex.mechanisms._engine.record import run_recorded
from reflex.mechanisms._engine.terms import ScoreTransform
from reflex.mechanisms._options import typed_options
from reflex.registry import Case, Mechanism, register

__all__ = ["flex_attention"]


class _Indices:
    """The broadcastable index arrays a mod receives: ``b (B,1,1,1)``, ``h (1,H,1,1)``, and per tile
    ``q_idx (1,1,l,1)``, ``kv_idx (1,1,1,s)`` (int64, the caller's library and device)."""

    def __init__(self, xp: Any, batch: int, heads: int, device: Any) -> None:
        self.xp = xp
        self.b = xp.reshape(xp.arange(batch, dtype=xp.int64, device=device), (batch, 1, 1, 1))
        self.h = xp.reshape(xp.arange(heads, dtype=xp.int64, device=device), (1, heads, 1, 1))

    def tile(self, rows: Any, cols: Any) -> tuple[Any, Any, Any, Any]:
        xp = self.xp
        return self.b, self.h, xp.reshape(rows, (1, 1, -1, 1)), xp.reshape(cols, (1, 1, 1, -1))


def _mask_term(xp: Any, mask_mod: Callable[..., Any], index: _Indices, device: Any) -> Callable[[Any, Any], Any]:
    def mask(rows: Any, cols: Any) -> Any:
        value = mask_mod(*index.tile(rows, cols))
        if not hasattr(value, "dtype"):
            value = xp.asarray(value, device=device)
        if value.dtype != xp.bool:
            raise TypeError(f"mask_mod must return booleans (True = attend); it returned dtype {value.dtype}")
        if value.ndim > 4:
            raise ValueError(f"mask_mod returned {value.ndim} axes; at most 4 (B, H, L, S) are allowed")
        return value
    return mask


def _score_transform(score_mod: Callable[..., Any], score_mod_grad: Callable[..., Any] | None,
                     index: _Indices) -> ScoreTransform:
    def apply(s: Any, rows: Any, cols: Any) -> Any:
        return score_mod(s, *index.tile(rows, cols))

    slope = None if score_mod_grad is None else (lambda s, rows, cols: score_mod_grad(s, *index.tile(rows, cols)))
    vjp = getattr(score_mod, "vjp", None)
    params = getattr(score_mod, "params", None) if callable(vjp) else None
    param_vjp = None if params is None else (lambda s, rows, cols, d: vjp(s, *index.tile(rows, cols), d))
    return ScoreTransform(apply, slope=slope, params=params, vjp=param_vjp)


@typed_options()
def flex_attention(q: Any, k: Any, v: Any, /, *, score_mod: Callable[..., Any] | None = None,
                   mask_mod: Callable[..., Any] | None = None, scale: float | None = None, enable_gqa: bool = False,
                   return_lse: bool = False, implementation: str = "auto",
                   score_mod_grad: Callable[..., Any] | None = None, compute_dtype: Any = None) -> Any:
    """PyTorch FlexAttention (``torch.nn.attention.flex_attention``) on reflex's engine, in float64.

    .. math::

        s_{bhij} = \\mathrm{score\\_mod}(\\mathrm{scale}\\; q_{bhi}\\cdot k_{bgj},\\ b, h, i, j),\\qquad
        s_{bhij} = -\\infty \\text{ where } \\mathrm{mask\\_mod}(b, h, i, j) \\text{ is False},

        O_{bhi} = \\sum_j \\mathrm{softmax}_j(s_{bhi})\\, v_{bgj},\\qquad
        \\mathrm{lse}_{bhi} = \\log \\textstyle\\sum_j e^{s_{bhij}}

    Shapes (torch's): ``q (B, H, L, D)``, ``k (B, G, S, D)``, ``v (B, G, S, E)`` → ``out (B, H, L, E)``
    and, with ``return_lse``, ``lse (B, H, L)`` (natural log). Kv head ``g = h // (H/G)``.

    The mods are **vectorised**: reflex calls each once per tile (once for the dense kernel) on
    broadcastable int64 index arrays of the caller's library and device — ``b (B, 1, 1, 1)``,
    ``h (1, H, 1, 1)`` (the query head), ``q_idx (1, 1, l, 1)``, ``kv_idx (1, 1, 1, s)`` — and
    ``score (B, H, l, s)``, the scaled scores of the tile. Write them with the caller's library's
    operators (``xp.where``, comparisons, arithmetic, captured arrays); a torch FlexAttention mod
    that uses only elementwise torch ops works unchanged on torch inputs.

    Args:
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score'`` broadcastable to ``score``,
            applied to the scaled scores before masking (−∞ entries act as a mask).
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``, broadcastable to ``(B, H, l, s)``,
            True = attend. The tiled kernel skips tiles whose mask tile is all False on NumPy;
            on other libraries every tile is computed (a fully masked tile adds nothing).
        scale: multiplies q·k; default 1/√D.
        enable_gqa: must be True when G < H (as torch requires).
        return_lse: also return the lse.
        implementation: ``"dense"``, ``"tiled"`` (online softmax, O(L·tile) memory) or ``"auto"``.
        score_mod_grad: ``score_mod_grad(score, b, h, q_idx, kv_idx) -> ∂score_mod/∂score``
            (elementwise), needed only by :func:`reflex.vjp` when ``score_mod`` is given.
        compute_dtype: arithmetic dtype (default float64).

    A fully masked row (or one whose every score is −∞) outputs 0 and lse −∞ (torch's convention).
    The engine options every q, k, v mechanism takes (``mask``, ``bias``, ``softcap``, ``sinks``,
    ``layout``) compose after ``score_mod``: score_mod, then softcap, biases and masks.
    ``docs/flex_and_flash.md`` maps each FlexAttention idiom and flash-attn ``attention_ref``
    option to its reflex spelling.

    Gradients (:func:`reflex.vjp`, ``inputs`` = q, k, v and any buffers): mask-only calls need
    nothing more. With a ``score_mod``, pass ``score_mod_grad`` (otherwise ``NotImplementedError``);
    ``dS_raw = dZ ∘ score_mod_grad``. Captured buffers get gradients when ``score_mod`` has
    ``params`` (name → the captured array) and ``vjp(score, b, h, q_idx, kv_idx, d_value) ->
    {name: gradient}``, the gradient of ``⟨d_value, score_mod(score, …)⟩`` on one tile (summed over
    tiles); give those arrays in ``inputs`` under the same names.

    Raises ``ValueError`` for inputs that are not 4-D, ``G < H`` without ``enable_gqa``, or a
    ``score_mod_grad`` without ``score_mod``; ``TypeError`` for a mod that is not callable or a
    ``mask_mod`` that returns non-booleans.

    Source: Dong, Feng, Guessous, Liang, He 2024, "FlexAttention: A Programming Model for Generating
    Optimized Attention Kernels" (arXiv:2412.05496), the score_mod/mask_mod programming model; PyTorch's
    ``torch.nn.attention.flex_attention`` (the semantics matched here, checked against it in the tests).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have 4 axes (B, heads, length, dim) as torch flex_attention; "
                             f"got shape {tuple(x.shape)}")
    for name, mod in (("score_mod", score_mod), ("mask_mod", mask_mod), ("score_mod_grad", score_mod_grad)):
        if mod is not None and not callable(mod):
            raise TypeError(f"{name} must be a callable or None; got {type(mod).__name__}")
    if score_mod_grad is not None and score_mod is None:
        raise ValueError("score_mod_grad was given without score_mod")
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    if p.kv_heads != p.heads and not enable_gqa:
        raise ValueError(f"q has {p.heads} heads and k, v have {p.kv_heads}: pass enable_gqa=True for GQA "
                         f"(as torch flex_attention requires)")
    index = _Indices(p.xp, p.batch[0], p.heads, p.device)
    mask = None if mask_mod is None else _mask_term(p.xp, mask_mod, index, p.device)
    bias = None if score_mod is None else _score_transform(score_mod, score_mod_grad, index)
    return _kernels.softmax_attention(p, scale=_kernels.resolve_scale(scale, p.dim), mask=mask, bias=bias,
                                      implementation=implementation, return_lse=return_lse)


def _vjp(inputs: Mapping[str, Any], d_out: Any, *, d_lse: Any = None, **params: Any) -> dict[str, Any]:
    """VJP of :func:`flex_attention` through the engine's backward (see its docstring)."""
    score_mod = params.get("score_mod")
    if score_mod is not None and params.get("score_mod_grad") is None:
        raise NotImplementedError("flex_attention: reflex.vjp needs score_mod_grad(score, b, h, q_idx, kv_idx) "
                                  "(the elementwise derivative of score_mod) when a score_mod is given; "
                                  "a score_mod is a black box to reflex")
    own = {name: inputs[name] for name in ("q", "k", "v")}
    buffers = {name: x for name, x in inputs.items() if name not in own}
    available = getattr(score_mod, "params", {}) if callable(getattr(score_mod, "vjp", None)) else {}
    for name in buffers:
        if name not in available:
            raise NotImplementedError(f"flex_attention: no gradient for input {name!r}: it is not in "
                                      f"score_mod.params (names: {', '.join(available) or 'none'})")
    result, calls = run_recorded(flex_attention, own, params, return_lse=d_lse is not None)
    out = result[0] if d_lse is not None else result
    (call,) = [c for c in calls if c.out is out]
    grads = call.backward(d_out, d_lse)
    found = {"q": grads.dq, "k": grads.dk, "v": grads.dv}
    term_grads = grads.bias[0] if grads.bias else None
    for name, x in buffers.items():
        found[name] = term_grads[name]
    return found


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(heads=d["H"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    return [
        Case("mha", qkv(seed, kv_heads=d["H"], **shapes), {}, seed=seed),
        Case("gqa", qkv(seed, kv_heads=d["G"], **shapes), {"enable_gqa": True}, seed=seed),
    ]


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """The dense path of :func:`flex_attention`."""
    return flex_attention(q, k, v, **params, implementation="dense")


register(Mechanism(
    key="flex",
    function=flex_attention,
    family="A. core",
    paper="PyTorch FlexAttention (Dong, Feng, Guessous, Liang, He 2024, arXiv:2412.05496), score_mod/mask_mod",
    params={
        "score_mod": "score_mod(score, b, h, q_idx, kv_idx) -> score, vectorised on broadcastable index arrays",
        "mask_mod": "mask_mod(b, h, q_idx, kv_idx) -> bool, True = attend",
        "scale": "score scale, default 1/sqrt(D)",
        "enable_gqa": "required when k, v have fewer heads than q",
        "score_mod_grad": "d score_mod / d score (elementwise), for reflex.vjp",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    vjp=_vjp,
))
