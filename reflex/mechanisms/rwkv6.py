"""RWKV-6 (Finch) time mixing: GLA-style per-channel decay, read before the write, a bonus for the current token."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import numpy_namespace
from reflex.mechanisms import _recurrent
from reflex.mechanisms._inputs import check_array, prepare
from reflex.mechanisms._options import Real, typed_options
from reflex.mechanisms._patterns import check_positive_int
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._numerics import unbroadcast

__all__ = ["rwkv6_attention"]


def _check_inputs(q: Any, k: Any, v: Any, decay: Any, bonus: Any, initial_state: Any, form: Any, chunk_size: Any,
                  compute_dtype: Any) -> tuple[Any, ...]:
    _recurrent.check_form(form)
    check_positive_int("chunk_size", chunk_size)
    p = prepare(q, k, v, compute_dtype=compute_dtype)
    xp, dtype = p.xp, p.q.dtype
    if p.kv_heads != p.heads:
        raise ValueError(f"k and v have {p.kv_heads} heads; q (r) has {p.heads}: RWKV-6 has one key/value head per head")
    if p.length != p.key_length:
        raise ValueError(f"q has length {p.length}; k and v have {p.key_length}: they must match (T)")
    H, T, D, E = p.heads, p.length, p.dim, p.value_dim
    decay = _recurrent.check_log_decay(xp, p.device, dtype, "decay", decay)
    _recurrent.check_shape("decay", decay, (*p.batch, H, T, D), "(..., H, T, D)")
    bonus = check_array(xp, p.device, dtype, "bonus", bonus)
    _recurrent.check_shape("bonus", bonus, (H, D), "(H, D)")
    state = _recurrent.initial_state(xp, p.device, dtype, initial_state, (*p.batch, H, D, E), "(..., H, D, E)")
    terms = _recurrent.Terms(
        xp=xp, device=p.device, q=xp.expand_dims(p.q, axis=-3), k=xp.expand_dims(p.k, axis=-3),
        v=xp.expand_dims(p.v, axis=-3), decay=xp.expand_dims(decay, axis=-3),
        bonus=xp.reshape(bonus, (H, 1, 1, D)), read_before=True)
    return p, terms, state


@typed_options(scale=Real())
def rwkv6_attention(q: Any, k: Any, v: Any, /, *, decay: Any, bonus: Any, initial_state: Any = None,
                    scale: float = 1.0, return_state: bool = False, form: str = "auto", chunk_size: int = 64,
                    compute_dtype: Any = None) -> Any:
    """RWKV-6: o_t = τ (S_{t−1} + diag(u) k_t v_tᵀ)ᵀ r_t, then S_t = diag(e^{w_t}) S_{t−1} + k_t v_tᵀ.

    .. math::

        o_t = \\tau\\,\\big(S_{t-1} + \\mathrm{diag}(u)\\, k_t v_t^\\top\\big)^\\top r_t,\\qquad
        S_t = \\mathrm{diag}(e^{w_t})\\, S_{t-1} + k_t v_t^\\top

    (Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence",
    §4, Finch time mixing / wkv). The read comes *before* the write: the current token enters only
    through the bonus u. The state ``S ∈ ℝ^{D×E}`` has rows indexed by key channels (the
    flash-linear-attention layout; RWKV's own CUDA kernel keeps ``Sᵀ``).

    Shapes: ``q`` (the receptance r) ``(..., H, T, D)``, ``k (..., H, T, D)``, ``v (..., H, T, E)``,
    ``decay`` w ``(..., H, T, D)`` in log space (``w = −exp(w_raw)`` in RWKV-6, so ``w ≤ 0``),
    ``bonus`` u ``(H, D)``, state ``(..., H, D, E)`` → ``(..., H, T, E)``. No GQA.

    Args:
        decay: log decay per channel, ≤ 0 and finite (pass ``−exp(w_raw)``, not ``exp(−exp(w_raw))``).
        bonus: u, the per-channel weight of the current token (RWKV's ``time_first``/``u``).
        initial_state: ``S_0 (..., H, D, E)``, zeros if None.
        scale: τ applied to the read. Default 1, what RWKV checkpoints expect (RWKV-LM and the Hub's
            RWKV-6 model pass 1); flash-linear-attention's ``chunk_rwkv6``/``fused_recurrent_rwkv6``
            default to ``D^{-1/2}``: pass ``scale=D ** -0.5`` to match them.
        return_state: also return ``S_T (..., H, D, E)``.
        form: ``"recurrent"``, ``"chunked"`` (exclusive segment sums ``Σ_{j<s<i} w_s``, never a positive
            exponent), ``"parallel"`` (one chunk spanning T) or ``"auto"`` (Numba for plain NumPy
            float64, chunked otherwise); they agree to round-off.
        chunk_size: chunk length of ``"chunked"``, any int ≥ 1.
        compute_dtype: arithmetic dtype (default float64).

    Raises:
        ValueError: decay > 0 or not finite, shape mismatches (named), GQA.
    """
    p, terms, state = _check_inputs(q, k, v, decay, bonus, initial_state, form, chunk_size, compute_dtype)
    out, state = _recurrent.run(terms, state, scale=float(scale), form=form, chunk_size=chunk_size)
    out = out[..., 0, :, :]
    return (out, state[..., 0, :, :]) if return_state else out


def _vjp(inputs: dict[str, Any], d_out: Any, *, d_lse: Any = None, d_state: Any = None, scale: float = 1.0,
         return_state: bool = False, form: str = "auto", chunk_size: int = 64, compute_dtype: Any = None) -> dict[str, Any]:
    """Reverse-time scan with the read before the write (``dS_{t−1} += τ r_t dO_tᵀ``) and the bonus
    term ``τ (r·(u∘k)) v``: ``du = τ Σ (dO·v) r∘k`` summed over batch and time."""
    del d_lse, return_state
    p, terms, state = _check_inputs(inputs["q"], inputs["k"], inputs["v"], inputs["decay"], inputs["bonus"],
                                    inputs.get("initial_state"), form, chunk_size, compute_dtype)
    xp = p.xp
    d_out = xp.expand_dims(xp.astype(d_out, p.q.dtype), axis=-3)
    if d_state is not None:
        d_state = xp.expand_dims(xp.astype(d_state, p.q.dtype), axis=-3)
    grads = _recurrent.vjp_terms(terms, state, d_out, d_state, scale=float(scale))
    H, D = p.heads, p.dim
    result = {name: grads[name][..., 0, :, :] for name in ("q", "k", "v", "decay")}
    result["bonus"] = xp.reshape(unbroadcast(xp, grads["bonus"], (H, 1, 1, D)), (H, D))
    if inputs.get("initial_state") is not None:
        result["initial_state"] = grads["state"][..., 0, :, :]
    return result


def _draw(seed: int, *, batch: int, heads: int, length: int, dim: int, value_dim: int, state: bool) -> dict[str, Any]:
    """Host inputs: r, k, v ~ N(0, 1); w = −exp(N(−1, 0.5)); u ~ N(0, 1); S_0 ~ N(0, 1)."""
    host = numpy_namespace()
    inputs = {
        "q": random.normal((batch, heads, length, dim), seed=(seed, 0)),
        "k": random.normal((batch, heads, length, dim), seed=(seed, 1)),
        "v": random.normal((batch, heads, length, value_dim), seed=(seed, 2)),
        "decay": -host.exp(0.5 * random.normal((batch, heads, length, dim), seed=(seed, 3)) - 1.0),
        "bonus": random.normal((heads, dim), seed=(seed, 4)),
    }
    if state:
        inputs["initial_state"] = random.normal((batch, heads, dim, value_dim), seed=(seed, 5))
    return inputs


def _cases(size: str, seed: int) -> list[Case]:
    from reflex.mechanisms._cases import dims

    d = dims(size)
    shape = dict(batch=2, heads=d["H"], length=d["L"], dim=d["D"], value_dim=d["E"])
    return [
        Case("chunked", _draw(seed, state=False, **shape), {"form": "chunked", "chunk_size": 3}, seed=seed),
        Case("state_fla_scale", _draw(seed, state=True, **shape),
             {"form": "chunked", "chunk_size": 5, "scale": d["D"] ** -0.5}, seed=seed),
        Case("recurrent", _draw(seed, state=True, **shape), {"form": "recurrent"}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", _draw(seed, batch=1, heads=heads, length=seq, dim=dim, value_dim=dim, state=False), {},
                seed=seed)


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """The token-by-token recurrence (array-API path)."""
    return rwkv6_attention(q, k, v, **{**params, "form": "recurrent"})


register(Mechanism(
    key="rwkv6",
    function=rwkv6_attention,
    family="K. state-recurrent linear",
    paper="Peng et al. 2024, 'Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence', §4",
    params={
        "decay": "w, log decay per channel (..., H, T, D), <= 0",
        "bonus": "u, (H, D): weight of the current token (read before write)",
        "initial_state": "(..., H, D, E), zeros if None",
        "scale": "read scale, default 1 (RWKV); fla defaults to D**-0.5",
        "return_state": "also return the final state (..., H, D, E)",
        "form": "'recurrent' | 'chunked' | 'parallel' | 'auto'",
        "chunk_size": "chunk length of 'chunked' (any int >= 1)",
    },
    cases=_cases,
    reference=_reference,
    row_separable=False,
    example=_example,
    vjp=_vjp,
    returns_state=True,
))
