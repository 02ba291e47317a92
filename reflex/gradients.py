"""Reference gradients: :func:`vjp`, the reverse-mode derivative of any mechanism that declares one.

A mechanism's VJP lives beside its forward (its registry record's ``vjp``); this module is the one
public entry point. It checks the arguments, dispatches, and checks that the result holds a gradient
for every floating input, shaped like that input — so a mechanism's VJP cannot silently drop one.

Conventions (every VJP keeps them):

- ``inputs`` names every array argument of the mechanism by its parameter name: positional ``q``,
  ``k``, ``v``, ... and keyword arrays such as ``bias``, ``slopes``, ``table``. Options that are not
  arrays go in ``**params`` exactly as the forward takes them.
- The gradient of the scalar ``⟨d_out, out⟩ + ⟨d_lse, lse⟩ + ⟨d_state, state⟩`` is returned for every
  **floating** array in ``inputs``: same shape, same array library and device as that input, in the
  compute dtype (float64 unless ``compute_dtype=`` says otherwise). Boolean masks and integer index
  arrays get no entry.
- Piecewise quantities (top-k, argmax, hashing, clamping) follow the forward's branch: selections are
  constants, and the subgradient at a tie is 0. Each mechanism's docstring says which.
"""

from __future__ import annotations

from typing import Any, Mapping

from reflex import registry
from reflex.backends import namespace

__all__ = ["vjp"]


def vjp(key: str, inputs: Mapping[str, Any], d_out: Any, *, d_lse: Any = None, d_state: Any = None,
        **params: Any) -> dict[str, Any]:
    """Gradients of ``⟨d_out, out⟩ + ⟨d_lse, lse⟩ + ⟨d_state, state⟩`` for every floating input of ``key``.

    Args:
        key: a registered mechanism (``reflex list --vjp`` lists those with a VJP).
        inputs: parameter name → array, every array argument of the mechanism.
        d_out: cotangent of the output, shaped like the output.
        d_lse: cotangent of the lse ``(..., H, L)``; only for mechanisms that return one.
        d_state: cotangent of the final state; only for state-recurrent mechanisms.
        **params: the mechanism's non-array options, as its forward takes them.

    Returns:
        ``{name: gradient}`` for every floating array in ``inputs`` (same shape, library and device).

    Raises:
        NotImplementedError: the mechanism has no VJP (the message names it).
        TypeError: ``inputs`` is not a mapping of names to arrays, or mixes array libraries.
        ValueError: ``d_lse``/``d_state`` given to a mechanism without that output.
    """
    mechanism = registry.get(key)
    if mechanism.vjp is None:
        raise NotImplementedError(f"mechanism {key!r} has no VJP; `reflex list --vjp` lists those that have one")
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError(f"inputs must be a non-empty mapping of argument names to arrays; got {type(inputs).__name__}")
    for name, x in inputs.items():
        if not isinstance(name, str) or not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"inputs[{name!r}] must be an array; got {type(x).__name__}")
    if d_lse is not None and not mechanism.returns_lse:
        raise ValueError(f"d_lse was given, but {key!r} returns no lse")
    if d_state is not None and not mechanism.returns_state:
        raise ValueError(f"d_state was given, but {key!r} returns no state")
    xp = namespace(*inputs.values(), *(t for t in (d_out, d_lse, d_state) if t is not None))
    extra = {} if d_state is None else {"d_state": d_state}
    function = mechanism.function
    generic = [n for n in getattr(function, "generic_terms", ()) if inputs.get(n) is not None
               or params.get(n) is not None]
    if generic and not getattr(mechanism.vjp, "shared_engine", False):
        raise NotImplementedError(f"{key!r}'s VJP is its own, not the engine's shared one: it does not differentiate "
                                  f"the generic {', '.join(generic)} option(s)")
    if getattr(function, "generic_layout", False) and params.get("layout", "bhld") != "bhld":
        return _vjp_in_flash_layout(key, dict(inputs), d_out, d_lse, extra, params)
    if getattr(function, "generic_sinks", False) and inputs.get("sinks") is not None:
        return _vjp_with_sinks(mechanism, dict(inputs), d_out, d_lse, extra, params)
    params.pop("layout", None)
    grads = mechanism.vjp(dict(inputs), d_out, d_lse=d_lse, **extra, **params)
    floating = [name for name, x in inputs.items() if xp.isdtype(x.dtype, "real floating")]
    missing = [name for name in floating if name not in grads]
    if missing:
        raise AssertionError(f"{key!r}'s VJP returned no gradient for {', '.join(missing)} (a bug in reflex)")
    for name in floating:
        if tuple(grads[name].shape) != tuple(inputs[name].shape):
            raise AssertionError(f"{key!r}'s VJP returned d_{name} of shape {tuple(grads[name].shape)}; "
                                 f"{name} has {tuple(inputs[name].shape)} (a bug in reflex)")
    return {name: grads[name] for name in floating}


def _vjp_in_flash_layout(key: str, inputs: dict, d_out: Any, d_lse: Any, extra: dict, params: dict) -> dict:
    """``layout="blhd"``: the VJP in reflex's layout, with q, k, v, d_out and their gradients transposed."""
    from reflex.mechanisms._options import LAYOUTS, _swap_heads_and_length

    layout = params.pop("layout")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    names = ("q", "k", "v", "qv")  # qv: full_attention's extra query, in q's layout
    swapped = {name: _swap_heads_and_length(x) if name in names else x for name, x in inputs.items()}
    grads = vjp(key, swapped, _swap_heads_and_length(d_out), d_lse=d_lse, **extra, **params)
    return {name: _swap_heads_and_length(g) if name in names else g for name, g in grads.items()}


def _vjp_with_sinks(mechanism: registry.Mechanism, inputs: dict, d_out: Any, d_lse: Any, extra: dict,
                    params: dict) -> dict:
    """``sinks=``: the chain rule through the sink merge (:func:`reflex.mechanisms._merge.sinks_vjp`)."""
    import inspect

    from reflex.mechanisms._merge import sinks_vjp

    sinks = inputs.pop("sinks")
    xp = namespace(sinks, d_out)
    signature = inspect.signature(mechanism.function)
    positional = [n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    args = [inputs[n] for n in positional if n in inputs]
    keywords = {n: x for n, x in inputs.items() if n not in positional}
    out, lse = mechanism.function(*args, **keywords, **{**params, "return_lse": True})
    d_out_inner, d_lse_inner, d_sinks = sinks_vjp(xp, out, lse, xp.astype(sinks, out.dtype), xp.astype(d_out, out.dtype),
                                                  None if d_lse is None else xp.astype(d_lse, out.dtype))
    grads = vjp(mechanism.key, inputs, d_out_inner, d_lse=d_lse_inner, **extra, **params)
    return {**grads, "sinks": d_sinks}
