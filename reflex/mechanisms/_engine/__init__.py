"""The shared engine: dense, tiled and gather softmax attention on the array API.

Most mechanisms are softmax attention over a restricted or re-weighted set of (query, key) pairs.
They compile to three kernels that share one set of semantics:

.. math::

    s_{ij} = \\mathrm{cap}(\\mathrm{scale}\\; q_i \\cdot k_j) + \\sum b_{ij}, \\qquad
    s_{ij} = -\\infty \\text{ where any mask is False},

    o_i = \\sum_j \\frac{e^{s_{ij} - m_i}}{\\ell_i} v_j, \\quad m_i = \\max_j s_{ij},\\quad
    \\ell_i = \\sum_j e^{s_{ij} - m_i},\\quad \\mathrm{lse}_i = m_i + \\log \\ell_i,

with ``cap(x) = c·tanh(x/c)`` when a softcap ``c`` is given. Conventions decided here:

- Softmax is max-shifted. A row whose every score is −∞ (fully masked) outputs 0 and lse −∞;
  no NaN is produced (the shift uses 0 when the row max is −∞, and ℓ = 0 divides as 1).
- Boolean masks: True = attend. Several masks are ANDed; several biases are added.
- Arithmetic runs in the dtype of the prepared q, k, v (float64 unless ``compute_dtype`` says
  otherwise); nothing here names a dtype, so ``numpy.longdouble`` works on the dense path.
- GQA: query head ``h`` uses key/value head ``h // (H // G)`` (repeat-interleave, as torch
  ``enable_gqa`` and ONNX Attention). Kernels work on the grouped view ``(..., G, H/G, L, D)``
  against ``(..., G, 1, S, D)``, so key/value heads are never copied.

Masks and biases are *terms*: either an array broadcastable to ``(..., H, L, S)``, or a function
``term(rows, cols)`` of integer index grids (``rows`` of shape ``(l, 1)``, ``cols`` of shape
``(1, s)`` — or, in the gather kernel, the gathered key indices ``(..., H, l, K)``) returning an
array broadcastable to ``(..., H, l, s)``: a vectorised FlexAttention ``mask_mod``/``score_mod``.
Scores themselves are never hidden inside a term, so biases stay separate, differentiable inputs.

*Differentiable callable terms.* A bias term may carry its own parameters: an object that is
callable ``term(rows, cols) -> value`` as above and also has

- ``params: dict[str, array]`` — the parameter arrays the value is built from (the caller's
  arrays, or their compute-dtype casts), and
- ``vjp(rows, cols, d_value) -> dict[str, array]`` — the gradients of ``⟨d_value, term(rows,
  cols)⟩`` with respect to those parameters, each shaped like its parameter. ``d_value`` is dZ
  (the score cotangent, 0 on masked entries) reduced to the shape of ``term(rows, cols)`` on that
  tile (summed over the axes the value broadcasts along).

The backward kernels call ``vjp`` once per tile (once for dense; per query block for gather, with
the gathered key positions as ``cols``) and sum the returned gradients over tiles. A plain callable
(no ``vjp``) is treated as a constant; an array bias gets ``d_bias`` summed over its broadcast axes.

*Score transforms.* A :class:`~.terms.ScoreTransform` in the bias slot rewrites a tile's raw scaled
scores, ``s = f(scale·q·k, rows, cols)``, before softcap, biases and masks (FlexAttention's
``score_mod``; dense and tiled kernels). Its ``slope`` (∂f/∂s) enters the backward's chain rule;
its optional ``params``/``vjp`` give parameter gradients as above.

*Masked keys are inert.* NaN or ±∞ stored in K or V where a row does not attend (masked, outside
its window, beyond causal, padding, −∞ bias) never reaches that row's output, lse or gradients;
rows that give a non-finite entry a nonzero weight get NaN/±∞ (:func:`~.terms.guarded`). Each
kernel tests K and V for finiteness once per call and takes a careful path only when needed.

*Dropout.* Every kernel takes ``dropout=Dropout(keep, rate)`` (:class:`~.dropout.Dropout`): an
explicit boolean keep mask M (a term; no hidden randomness) on the value product,
``o_i = Σ_j P_ij M̃_ij v_j`` with ``M̃ = M/(1 − p)``; P, m, ℓ and the lse are the undropped ones
(flash-attn's reference). Backward: ``dV = (P∘M̃)ᵀdO``, ``dP = (dO·Vᵀ)∘M̃``, ``D = rowsum(dO∘O)``.

*Backward.* :func:`dense_backward`, :func:`tiled_backward` and :func:`gather_backward` return the
VJP at a forward result (FA2 §3.1.2, Alg. 2; equations in :func:`dense_backward`). Mechanisms whose
forward is one engine call get their VJP from :func:`engine_vjp`, which records the call
(:func:`recording`) and maps the gradients back to the mechanism's inputs.

The engine lives in the package :mod:`reflex.mechanisms._engine` (one module per kernel,
forward and backward together, and :mod:`~reflex.mechanisms._engine.terms` for what they share);
:mod:`reflex.mechanisms._kernels` re-exports it for the mechanisms.

Inputs are validated and cast by :mod:`reflex.mechanisms._inputs` (re-exported here:
:func:`prepare`, :func:`check_term`, :func:`check_indices`, :func:`resolve_scale`, ...).

Kernels:
1. :func:`dense` — materialises ``(..., H, L, S)``. The definition of truth for small sizes.
   :func:`scores` and :func:`weights` return its score and probability maps.
2. :func:`tiled` — the same semantics streamed over (query block, key tile) pairs with an online
   softmax (running max and sum, Dao 2022, Alg. 1). Tiles that ``tile_active`` rules out, or whose
   mask tile has no True, are skipped. Memory O(block_q · block_k) per head; never ``L × S``.
3. :func:`gather` — each query attends an explicit list of key indices (``-1`` = padding;
   duplicates count once per occurrence), in query blocks.

Each module (:mod:`~reflex.mechanisms._engine.dense`, ``.tiled``, ``.gather``) holds its kernel's
forward and backward; :mod:`~reflex.mechanisms._engine.terms` what they share,
:mod:`~reflex.mechanisms._engine.record` the call recording and the shared mechanism VJP.
"""

from __future__ import annotations

from typing import Any

from reflex.mechanisms._engine.dense import dense, dense_backward, scores, weights
from reflex.mechanisms._engine.gather import GATHER_BLOCK_ELEMENTS, gather, gather_backward
from reflex.mechanisms._engine.record import EngineCall, engine_vjp, recording, run_recorded
from reflex.mechanisms._engine.dropout import Dropout, check_dropout
from reflex.mechanisms._engine.terms import Gradients, Term, TermGradient, TileActive, empty_result, finish
from reflex.mechanisms._engine.tiled import tiled, tiled_backward
from reflex.mechanisms._inputs import (Prepared, check_array, check_indices, check_term, prepare, resolve_dtype,
                                       resolve_scale, resolve_softcap)

__all__ = [
    "Prepared", "prepare", "check_term", "check_indices", "check_array", "dense", "tiled", "gather", "finish", "empty_result",
    "softmax_attention", "choose_implementation", "resolve_dtype", "resolve_scale", "resolve_softcap", "IMPLEMENTATIONS", "scores", "weights",
    "AUTO_TILED_ELEMENTS", "GATHER_BLOCK_ELEMENTS", "Term", "TileActive", "dense_backward", "tiled_backward",
    "gather_backward", "Gradients", "TermGradient", "EngineCall", "recording", "engine_vjp", "run_recorded",
    "Dropout", "check_dropout",
]

IMPLEMENTATIONS = ("auto", "dense", "tiled")
# "auto" streams when one head's score matrix would exceed this many elements (128 MiB in float64).
AUTO_TILED_ELEMENTS = 1 << 24


def choose_implementation(length: int, key_length: int) -> str:
    """The kernel ``implementation="auto"`` runs for L queries and S keys: ``"tiled"`` when one
    head's score matrix (L·S elements) exceeds :data:`AUTO_TILED_ELEMENTS`, else ``"dense"``."""
    return "tiled" if length * key_length > AUTO_TILED_ELEMENTS else "dense"


def softmax_attention(p: Prepared, *, scale: float, mask: Any = None, bias: Any = None, softcap: float | None = None,
                      tile_active: TileActive | None = None, implementation: str = "auto",
                      return_lse: bool = False, dropout: Dropout | None = None) -> Any:
    """Run :func:`dense` or :func:`tiled` as ``implementation`` says; ``out`` or ``(out, lse)``.

    ``dropout``: a :class:`~.dropout.Dropout` keep mask on the P·V product (lse undropped)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}")
    if implementation == "auto":
        implementation = choose_implementation(p.length, p.key_length)
    if implementation == "dense":
        out, lse = dense(p, scale=scale, mask=mask, bias=bias, softcap=softcap, dropout=dropout)
    else:
        out, lse = tiled(p, scale=scale, mask=mask, bias=bias, softcap=softcap, tile_active=tile_active,
                         dropout=dropout)
    return (out, lse) if return_lse else out
