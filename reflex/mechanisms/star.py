"""Star-Transformer attention: ring neighbours plus one relay node (Guo et al. 2019)."""

from __future__ import annotations

from typing import Any

from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, qkv
from reflex.mechanisms._patterns import (Pattern, causal_offset, check_alignment, check_positive_int, explicit_mask)
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["star_attention"]


def star_pattern(relay: int, ring: bool, key_length: int, offset: int) -> Pattern:
    """Query i (position a = i + δ) attends j iff a is the relay, j is the relay, |j − a| ≤ 1, or
    (ring, a in [0, S)) j − a ≡ ±1 (mod S)."""

    def allowed(rows: Any, cols: Any) -> Any:
        position = rows + offset
        rel = cols - position
        ok = (position == relay) | (cols == relay) | ((rel >= -1) & (rel <= 1))
        if ring:
            inside = (position >= 0) & (position < key_length)
            ok = ok | inside & ((rel == key_length - 1) | (rel == 1 - key_length))
        return ok

    def tile_active(i0: int, i1: int, j0: int, j1: int) -> bool:
        near = j0 <= i1 + offset and j1 - 1 >= i0 + offset - 1
        corners = ring and (j0 == 0 or j1 == key_length)
        return near or corners or i0 + offset <= relay < i1 + offset or j0 <= relay < j1

    return Pattern(allowed=allowed, tile_active=tile_active)


def _check(relay: Any, ring: Any, alignment: Any, key_length: int) -> tuple[int, bool, str]:
    relay = check_positive_int("relay", relay, minimum=0)
    if key_length and relay >= key_length:
        raise ValueError(f"relay must be a key position in [0, {key_length}); got {relay}")
    if not isinstance(ring, bool):
        raise ValueError(f"ring must be True or False; got {ring!r}")
    return relay, ring, check_alignment(alignment)


@typed_options()
def star_attention(q: Any, k: Any, v: Any, /, *, relay: int = 0, ring: bool = True, alignment: str = "top_left",
                   scale: float | None = None, return_lse: bool = False, compute_dtype: Any = None,
                   implementation: str = "auto") -> Any:
    """Star-Transformer attention: each token sees its ring neighbours and the relay; the relay sees all.

    .. math::

        O_i = \\mathrm{softmax}_{j \\in A_i}(\\mathrm{scale}\\; q_i \\cdot k_j)\\, v_j, \\qquad
        A_i = \\begin{cases} [0, S) & a_i = r \\\\ \\{a_i - 1, a_i, a_i + 1\\} \\cup \\{r\\} & \\text{otherwise}
        \\end{cases}

    with ``a_i = i + δ`` and the neighbours taken modulo S on the ring. The relay ``r`` is one token
    of the sequence (the paper's relay node s appended to the satellites h₁…hₙ, e.g. at position 0);
    one call is one round of the paper's update with the satellite context
    [h_{i−1}; h_i; h_{i+1}; s] and the relay context [s; H] (the embedding term eᵢ is left to the
    caller, who may append it as a key).

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``out (..., H, L, E)``;
    GQA by head groups.

    Args:
        relay: key position of the relay node (default 0).
        ring: True (default): position 0 and S − 1 are neighbours (the paper's ring); False: a chain.
        alignment: ``"top_left"`` (δ = 0) or ``"bottom_right"`` (δ = S − L).
        scale, return_lse, compute_dtype, implementation: as :func:`full_attention`.

    The output equals ``full_attention`` with the pattern as a boolean mask.

    Reference: Guo et al. 2019, "Star-Transformer", §3 (eqs. 5–9: satellite and relay updates).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    relay, ring, alignment = _check(relay, ring, alignment, p.key_length)
    pattern = star_pattern(relay, ring, p.key_length, causal_offset(alignment, p.length, p.key_length))
    return _kernels.softmax_attention(p, scale=_kernels.resolve_scale(scale, p.dim), mask=pattern.allowed,
                                      tile_active=pattern.tile_active, implementation=implementation,
                                      return_lse=return_lse)


def _pattern(q: Any, k: Any, v: Any, /, *, relay: int = 0, ring: bool = True, alignment: str = "top_left",
             **_: Any) -> Any:
    """The star pattern as a boolean ``(..., H, L, S)`` mask."""
    p = _kernels.prepare(q, k, v)
    relay, ring, alignment = _check(relay, ring, alignment, p.key_length)
    pattern = star_pattern(relay, ring, p.key_length, causal_offset(alignment, p.length, p.key_length))
    return explicit_mask(p.xp, p.device, p.score_shape, pattern.allowed)


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    gqa = qkv(seed, heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    return [
        Case("ring", gqa, {}, seed=seed),
        Case("chain_relay_middle", gqa, {"relay": d["S"] // 2, "ring": False}, seed=seed),
        Case("bottom_right", gqa, {"relay": 1, "alignment": "bottom_right"}, seed=seed),
    ]


register(Mechanism(
    key="star",
    function=star_attention,
    family="B. position-sparse",
    paper="Guo et al. 2019 §3 (Star-Transformer)",
    params={
        "relay": "key position of the relay node (default 0)",
        "ring": "True: ring neighbours wrap around; False: chain",
        "alignment": "'top_left' | 'bottom_right'",
    },
    cases=_cases,
    returns_lse=True,
    pattern=_pattern,
    vjp=_kernels.engine_vjp(star_attention),
))
