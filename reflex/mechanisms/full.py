"""Full (dense) softmax attention: the reference every restricted mechanism is checked against."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, qkv
from reflex.mechanisms._patterns import mask_and_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["full_attention"]


@typed_options()
def full_attention(q: Any, k: Any, v: Any, /, *, mask: Any = None, bias: Any = None, causal: bool | str = False,
                   scale: float | None = None, softcap: float | None = None, dropout_mask: Any = None,
                   dropout_p: float = 0.0, return_lse: bool = False, compute_dtype: Any = None,
                   implementation: str = "auto") -> Any:
    """Scaled dot-product softmax attention with masks, biases, causal alignment, softcap and GQA.

    .. math::

        O = \\mathrm{softmax}\\big(\\mathrm{cap}(\\mathrm{scale}\\cdot QK^\\top) + \\mathrm{bias}
            + \\log \\mathrm{mask}\\big)\\, V, \\qquad \\mathrm{cap}(x) = c\\tanh(x / c)

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``out (..., H, L, E)``,
    with any number of leading batch axes ``...`` (including none), equal on q, k, v.

    Args:
        mask: boolean, True = attend, broadcastable to ``(..., H, L, S)``.
        bias: additive scores, broadcastable to ``(..., H, L, S)`` (−∞ entries act as a mask).
        causal: ``False``; ``True`` or ``"top_left"`` (key j ≤ i, torch SDPA ``is_causal``);
            ``"bottom_right"`` (j ≤ i + S − L, flash-attn; the last query sees every key).
        scale: multiplies q·k; default 1/√D.
        softcap: c > 0 applies ``c·tanh(s/c)`` to the scaled scores before bias and mask
            (Gemma 2; as flash-attn and ONNX Attention).
        dropout_mask: boolean keep mask broadcastable to ``(..., H, L, S)``, True = keep; used when
            ``dropout_p > 0`` (required then: reflex draws no random numbers, build one with
            :mod:`reflex.random`). ``O = (P∘M)·V/(1 − p)`` with P the undropped probabilities.
        dropout_p: the dropout rate p in [0, 1); 0 (default) is no dropout and ignores the mask.
            The lse is the undropped one (flash-attn's reference ``attention_ref``).
        return_lse: also return ``lse (..., H, L)``, the natural-log logsumexp of the final scores.
        compute_dtype: arithmetic dtype (default float64, whatever the inputs); the output has it.
        implementation: ``"dense"`` (materialise scores), ``"tiled"`` (online softmax over tiles,
            O(L·tile) memory, causal tiles skipped) or ``"auto"`` (tiled when L·S > 2²⁴).

    GQA/MQA: with G < H key/value heads, query head h uses kv head ``h // (H/G)``.
    A fully masked row gives output 0 and lse −∞ (never NaN). Output is in the caller's array
    library and on its device.

    References: Vaswani et al. 2017, "Attention Is All You Need", §3.2.1 (eq. 1); Shazeer 2019
    (multi-query); Ainslie et al. 2023 (GQA); Gemma Team 2024, "Gemma 2", §2 (logit soft-capping).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    masks, tile_active = mask_and_causal(p, mask, causal, per_sequence=True)
    return _kernels.softmax_attention(
        p, scale=_kernels.resolve_scale(scale, p.dim), mask=masks,
        bias=_kernels.check_term(p, "bias", bias, boolean=False), softcap=_kernels.resolve_softcap(softcap),
        tile_active=tile_active, implementation=implementation, return_lse=return_lse,
        dropout=_kernels.check_dropout(p, dropout_mask, dropout_p),
    )


def _flash_layout(x: Any) -> Any:
    """A host ``(..., H, L, D)`` array in flash-attn's ``(..., L, H, D)`` layout."""
    from reflex.backends import numpy_namespace

    return numpy_namespace().permute_dims(x, (*range(x.ndim - 3), x.ndim - 2, x.ndim - 3, x.ndim - 1))


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(heads=d["H"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    mha = qkv(seed, kv_heads=d["H"], **shapes)
    gqa = qkv(seed, kv_heads=d["G"], **shapes)
    score_shape = (2, d["H"], d["L"], d["S"])
    mask = random.uniform(score_shape, seed=(seed, 3)) < 0.7
    mask[..., 0, :] = False  # one fully masked row per head: output 0, lse -inf
    bias = random.normal(score_shape, seed=(seed, 4))
    return [
        Case("mha", mha, {}, seed=seed),
        Case("gqa", gqa, {}, seed=seed),
        Case("causal_top_left", gqa, {"causal": "top_left"}, seed=seed),
        Case("causal_bottom_right", gqa, {"causal": "bottom_right"}, seed=seed),
        Case("mask", {**gqa, "mask": mask}, {}, seed=seed),
        Case("bias", {**gqa, "bias": bias}, {}, seed=seed),
        Case("softcap", gqa, {"softcap": 2.0, "scale": 1.0}, seed=seed),
        Case("sinks", {**gqa, "mask": mask, "sinks": random.normal((d["H"],), seed=(seed, 5))}, {}, seed=seed),
        Case("layout_blhd", {name: _flash_layout(x) for name, x in gqa.items()}, {"layout": "blhd", "causal": "bottom_right"},
             seed=seed),
    ]


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """The dense path of :func:`full_attention`."""
    return full_attention(q, k, v, **params, implementation="dense")


register(Mechanism(
    key="full",
    function=full_attention,
    family="A. core",
    paper="Vaswani et al. 2017 §3.2.1; Shazeer 2019 (MQA); Ainslie et al. 2023 (GQA); Gemma 2 2024 (softcap)",
    params={
        "mask": "boolean (..., H, L, S)-broadcastable, True = attend",
        "bias": "additive scores, (..., H, L, S)-broadcastable",
        "causal": "False | True | 'top_left' (j <= i) | 'bottom_right' (j <= i + S - L)",
        "scale": "score scale, default 1/sqrt(D)",
        "softcap": "c: scores -> c*tanh(scores/c) before bias and mask",
        "dropout_mask": "boolean keep mask (..., H, L, S)-broadcastable, True = keep (with dropout_p > 0)",
        "dropout_p": "dropout rate p in [0, 1): O = (P*M) V / (1 - p), lse undropped; 0 = no dropout",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    vjp=_kernels.engine_vjp(full_attention),
))
