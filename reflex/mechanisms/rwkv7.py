"""RWKV-7 (Goose) time mixing: the generalised delta rule, a diagonal-plus-rank-one state transition."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import numpy_namespace
from reflex.mechanisms import _recurrent
from reflex.mechanisms._inputs import check_array, prepare
from reflex.mechanisms._options import Real, typed_options
from reflex.mechanisms._patterns import check_positive_int
from reflex.registry import Case, Mechanism, register

__all__ = ["rwkv7_attention"]


def _check_inputs(q: Any, k: Any, v: Any, decay: Any, a: Any, b: Any, initial_state: Any, form: Any, chunk_size: Any,
                  compute_dtype: Any) -> tuple[Any, ...]:
    _recurrent.check_form(form)
    check_positive_int("chunk_size", chunk_size)
    p = prepare(q, k, v, compute_dtype=compute_dtype)
    xp, dtype = p.xp, p.q.dtype
    if p.kv_heads != p.heads:
        raise ValueError(f"k and v have {p.kv_heads} heads; q (r) has {p.heads}: RWKV-7 has one key/value head per head")
    if p.length != p.key_length:
        raise ValueError(f"q has length {p.length}; k and v have {p.key_length}: they must match (T)")
    H, T, D, E = p.heads, p.length, p.dim, p.value_dim
    decay = _recurrent.check_log_decay(xp, p.device, dtype, "decay", decay)
    _recurrent.check_shape("decay", decay, (*p.batch, H, T, D), "(..., H, T, D)")
    a = check_array(xp, p.device, dtype, "a", a)
    _recurrent.check_shape("a", a, (*p.batch, H, T, D), "(..., H, T, D)")
    b = check_array(xp, p.device, dtype, "b", b)
    _recurrent.check_shape("b", b, (*p.batch, H, T, D), "(..., H, T, D)")
    state = _recurrent.initial_state(xp, p.device, dtype, initial_state, (*p.batch, H, D, E), "(..., H, D, E)")
    terms = _recurrent.Terms(
        xp=xp, device=p.device, q=xp.expand_dims(p.q, axis=-3), k=xp.expand_dims(p.k, axis=-3),
        v=xp.expand_dims(p.v, axis=-3), decay=xp.expand_dims(decay, axis=-3), a=xp.expand_dims(a, axis=-3),
        b=xp.expand_dims(b, axis=-3))
    return p, terms, state


@typed_options(scale=Real())
def rwkv7_attention(q: Any, k: Any, v: Any, /, *, decay: Any, a: Any, b: Any, initial_state: Any = None,
                    scale: float = 1.0, return_state: bool = False, form: str = "auto", chunk_size: int = 64,
                    compute_dtype: Any = None) -> Any:
    """RWKV-7 generalised delta rule: S_t = (diag(e^{w_t}) + b_t a_tᵀ) S_{t−1} + k_t v_tᵀ, o_t = τ S_tᵀ r_t.

    .. math::

        S_t = \\big(\\mathrm{diag}(e^{w_t}) + b_t a_t^\\top\\big) S_{t-1} + k_t v_t^\\top,\\qquad
        o_t = \\tau\\, S_t^\\top r_t \\quad\\text{(read after the write)}

    (Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State Evolution", §4, eq. for the
    wkv state; the diagonal-plus-low-rank (DPLR) transition). State convention: ``S ∈ ℝ^{D×E}``, rows
    indexed by key channels (flash-linear-attention's). The paper and RWKV's own kernels keep the
    transpose ``𝒮 = Sᵀ ∈ ℝ^{E×D}`` and write ``𝒮_t = 𝒮_{t−1}(diag(w_t) + a_t b_tᵀ) + v_t k_tᵀ`` with the
    *multiplier* ``w_t``: transposing gives exactly this function with ``decay = log w_t`` and the same
    a, b (``a`` reads the old state, ``aᵀS_{t−1}``; ``b`` is the direction written). RWKV-7 itself uses
    ``a = −κ̂``, ``b = κ̂∘α`` (κ̂ the L2-normalised removal key, α ∈ (0, 1)^D the in-context learning
    rate) and ``w = −e^{−1/2}·σ(·)``. With ``w = 0``, ``a = −k``, ``b = βk`` and values ``βv`` it is
    DeltaNet (``linear_recurrent_attention(update_rule="delta")``).

    Shapes: ``q`` (receptance r), ``k``, ``decay``, ``a``, ``b`` ``(..., H, T, D)``, ``v (..., H, T, E)``,
    state ``(..., H, D, E)`` → ``(..., H, T, E)``. No GQA.

    Args:
        decay: w, log decay per channel, ≤ 0 and finite.
        a, b: the rank-one part of the transition (no constraint: the caller keeps it contractive).
        initial_state: ``S_0 (..., H, D, E)``, zeros if None.
        scale: τ, default 1 (RWKV-7 and fla's rwkv7 default).
        return_state: also return ``S_T (..., H, D, E)``.
        form: ``"recurrent"``, ``"chunked"`` (the WY/UT form of the DPLR recurrence: the chunk's
            ``aᵀS_{t−1}`` by forward substitution of a unit lower-triangular system, segment-sum decays,
            never a positive exponent), ``"parallel"`` (one chunk spanning T) or ``"auto"`` (Numba for
            plain NumPy float64, chunked otherwise); they agree to round-off.
        chunk_size: chunk length of ``"chunked"``, any int ≥ 1.
        compute_dtype: arithmetic dtype (default float64).

    Raises:
        ValueError: decay > 0 or not finite, shape mismatches (named), GQA.
    """
    p, terms, state = _check_inputs(q, k, v, decay, a, b, initial_state, form, chunk_size, compute_dtype)
    out, state = _recurrent.run(terms, state, scale=float(scale), form=form, chunk_size=chunk_size)
    out = out[..., 0, :, :]
    return (out, state[..., 0, :, :]) if return_state else out


def _vjp(inputs: dict[str, Any], d_out: Any, *, d_lse: Any = None, d_state: Any = None, scale: float = 1.0,
         return_state: bool = False, form: str = "auto", chunk_size: int = 64, compute_dtype: Any = None) -> dict[str, Any]:
    """Reverse-time scan: with G = dS_t, ``x = aᵀS_{t−1}``: ``db = G x``, ``dx = Gᵀb``,
    ``da = S_{t−1} dx``, ``dw = Σ_e G∘(e^w∘S_{t−1})``, ``dS_{t−1} = e^w∘G + a dxᵀ``."""
    del d_lse, return_state
    p, terms, state = _check_inputs(inputs["q"], inputs["k"], inputs["v"], inputs["decay"], inputs["a"], inputs["b"],
                                    inputs.get("initial_state"), form, chunk_size, compute_dtype)
    xp = p.xp
    d_out = xp.expand_dims(xp.astype(d_out, p.q.dtype), axis=-3)
    if d_state is not None:
        d_state = xp.expand_dims(xp.astype(d_state, p.q.dtype), axis=-3)
    grads = _recurrent.vjp_terms(terms, state, d_out, d_state, scale=float(scale))
    result = {name: grads[name][..., 0, :, :] for name in ("q", "k", "v", "decay", "a", "b")}
    if inputs.get("initial_state") is not None:
        result["initial_state"] = grads["state"][..., 0, :, :]
    return result


def _draw(seed: int, *, batch: int, heads: int, length: int, dim: int, value_dim: int, state: bool) -> dict[str, Any]:
    """Host inputs in RWKV-7's parametrisation: r, k, v ~ N(0, 1); w = −e^{−1/2}σ(N(0, 1));
    κ̂ a unit vector, α = σ(N(0, 1)); a = −κ̂, b = κ̂∘α."""
    host = numpy_namespace()

    def sigmoid(x: Any) -> Any:
        return 1.0 / (1.0 + host.exp(-x))

    kappa = random.normal((batch, heads, length, dim), seed=(seed, 4))
    kappa = kappa / host.sqrt(host.sum(kappa * kappa, axis=-1, keepdims=True))
    alpha = sigmoid(random.normal((batch, heads, length, dim), seed=(seed, 5)))
    inputs = {
        "q": random.normal((batch, heads, length, dim), seed=(seed, 0)),
        "k": random.normal((batch, heads, length, dim), seed=(seed, 1)),
        "v": random.normal((batch, heads, length, value_dim), seed=(seed, 2)),
        "decay": -0.6065306597126334 * sigmoid(random.normal((batch, heads, length, dim), seed=(seed, 3))),
        "a": -kappa,
        "b": kappa * alpha,
    }
    if state:
        inputs["initial_state"] = random.normal((batch, heads, dim, value_dim), seed=(seed, 6))
    return inputs


def _cases(size: str, seed: int) -> list[Case]:
    from reflex.mechanisms._cases import dims

    d = dims(size)
    shape = dict(batch=2, heads=d["H"], length=d["L"], dim=d["D"], value_dim=d["E"])
    return [
        Case("chunked", _draw(seed, state=False, **shape), {"form": "chunked", "chunk_size": 3}, seed=seed),
        Case("state", _draw(seed, state=True, **shape), {"form": "chunked", "chunk_size": 5}, seed=seed),
        Case("recurrent", _draw(seed, state=True, **shape), {"form": "recurrent"}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", _draw(seed, batch=1, heads=heads, length=seq, dim=dim, value_dim=dim, state=False), {},
                seed=seed)


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """The token-by-token recurrence (array-API path)."""
    return rwkv7_attention(q, k, v, **{**params, "form": "recurrent"})


register(Mechanism(
    key="rwkv7",
    function=rwkv7_attention,
    family="K. state-recurrent linear",
    paper="Peng et al. 2025, 'RWKV-7 \"Goose\" with Expressive Dynamic State Evolution', §4",
    params={
        "decay": "w, log decay per channel (..., H, T, D), <= 0",
        "a": "(..., H, T, D): reads the old state (RWKV-7: -kappa_hat)",
        "b": "(..., H, T, D): direction written (RWKV-7: kappa_hat * alpha)",
        "initial_state": "(..., H, D, E), zeros if None",
        "scale": "read scale, default 1",
        "return_state": "also return the final state (..., H, D, E)",
        "form": "'recurrent' | 'chunked' (WY/UT) | 'parallel' | 'auto'",
        "chunk_size": "chunk length of 'chunked' (any int >= 1)",
    },
    cases=_cases,
    reference=_reference,
    row_separable=False,
    example=_example,
    vjp=_vjp,
    returns_state=True,
))
