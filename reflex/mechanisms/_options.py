"""The typed-option layer: one declaration of every public function's options, checked before any work.

Every public mechanism function is wrapped by :func:`typed_options`. Before the function runs, the
wrapper checks

- the positional arrays (``q``, ``k``, ``v``, ...): arrays of one supported library — not ``None``,
  Python lists, strings or NumPy masked arrays;
- every keyword option against its :class:`Spec`: booleans are ``bool`` (``causal="False"`` is not
  truthy), integers are ``int`` within a documented range (checked before any allocation), reals are
  finite numbers in range, ``causal`` follows one convention, ``compute_dtype`` is a real floating
  dtype;
- every array-valued keyword option: same library and device as the first positional array, and a
  real floating dtype (masks boolean, index arrays integer; complex is always refused);

and after it returns, the overflow guard: an output that is not finite although every input is finite
means ``scale·q·k`` (or another intermediate) overflowed float64. reflex raises
:class:`FloatingPointError` there instead of returning NaN (NaN or ±inf in the inputs still flows to
the rows that use them). A run with a low-precision ``compute_dtype`` (float32, float16, bfloat16)
emulates that precision, overflow included, and is not guarded. Finally, the output must have the
compute dtype: a library that cannot hold
it (JAX without x64) is refused, never answered in a lower precision.

Specs (:mod:`reflex.mechanisms._option_specs`) are found by parameter name (:data:`BY_NAME`); a mechanism overrides or adds specs with keyword
arguments to :func:`typed_options`. Every error names the argument, what was expected and what came.

Causal convention (all mechanisms): ``causal`` is ``False``, ``True`` (= ``"top_left"``, key j ≤ i),
``"top_left"`` or ``"bottom_right"`` (j ≤ i + S − L). A mechanism that also takes ``alignment`` (windows,
ALiBi distances) reads a string ``causal`` as ``causal=True, alignment=<that string>``; passing both with
different alignments is an error. A mechanism that only defines top-left causality refuses
``"bottom_right"``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from reflex.backends import device as device_of
from reflex.backends import is_array, library_name, namespace
from reflex.mechanisms._option_specs import __all__ as specs_all
from reflex.mechanisms._option_specs import (ALIGNMENTS, BOOLEAN_ARRAYS, BY_NAME, INTEGER_ARRAYS, MAX_INT, Bool,  # noqa: F401
                                             Causal, ComputeDtype, Int, IntOrPair, OptionTypeError, Real, Seed, Spec,
                                             check_bool, check_int, check_real)

__all__ = ["typed_options", "LAYOUTS", *specs_all]


def _is_masked_array(x: Any) -> bool:
    return type(x).__name__ == "MaskedArray" and library_name(x) == "numpy"


def _dtype_text(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.").removeprefix("array_api_strict.")


def _check_positional(name: str, x: Any) -> None:
    if _is_masked_array(x):
        raise TypeError(f"{name} is a NumPy masked array; pass the data and a boolean mask= instead")
    if not is_array(x):
        raise TypeError(f"{name} must be an array (NumPy, CuPy, torch, array-api-strict, ...); got {type(x).__name__}")


def _check_option_array(name: str, x: Any, anchor_name: str, anchor: Any) -> None:
    """Library, device and dtype kind of an array-valued keyword option."""
    _check_positional(name, x)
    if library_name(x) != library_name(anchor):
        raise TypeError(f"{name} comes from a different array library than {anchor_name} ({library_name(x)} vs "
                        f"{library_name(anchor)}): pass all arrays from one library")
    if device_of(x) != device_of(anchor):
        raise ValueError(f"{name} is on device {device_of(x)}; {anchor_name} is on {device_of(anchor)}")
    xp = namespace(x)
    if name in BOOLEAN_ARRAYS:
        if not xp.isdtype(x.dtype, "bool"):
            raise TypeError(f"{name} must be a boolean array (True = attend); got dtype {_dtype_text(x.dtype)}")
    elif name in INTEGER_ARRAYS:
        if not xp.isdtype(x.dtype, "integral"):
            raise TypeError(f"{name} must be an integer array; got dtype {_dtype_text(x.dtype)}")
    elif not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating array; got dtype {_dtype_text(x.dtype)}"
                        + (" (complex values are not supported: the imaginary part would be lost)"
                           if xp.isdtype(x.dtype, "complex floating") else ""))


def _all_finite(x: Any) -> bool:
    xp = namespace(x)
    if not xp.isdtype(x.dtype, ("real floating", "complex floating")):
        return True
    return bool(xp.all(xp.isfinite(x)))


def _arrays_in(value: Any) -> list[Any]:
    if is_array(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [a for item in value for a in _arrays_in(item)]
    return []


LOW_PRECISION = ("float32", "float16", "bfloat16")


def _overflow_guard(function_name: str, arrays: dict[str, Any], result: Any) -> None:
    """Raise when the output is not finite although every input array is."""
    out = result[0] if isinstance(result, tuple) else result
    if not is_array(out) or _all_finite(out):
        return
    if _dtype_text(out.dtype) in LOW_PRECISION:  # an emulated low-precision run overflows as that dtype does
        return
    if all(_all_finite(a) for value in arrays.values() for a in _arrays_in(value)):
        sizes = ", ".join(f"max |{name}| = {float(namespace(a).max(namespace(a).abs(a))):.3g}"
                          for name, a in arrays.items() if is_array(a) and a.size and _real(a))
        raise FloatingPointError(
            f"{function_name}: the output is not finite although every input is — an intermediate (scale·q·k, a "
            f"norm or a feature) overflowed float64 ({sizes}). reflex refuses instead of returning NaN: scale "
            f"the inputs down")


def _real(a: Any) -> bool:
    return namespace(a).isdtype(a.dtype, "real floating")


def _check_output_dtype(function_name: str, compute_dtype: Any, result: Any) -> None:
    """The output must carry the requested precision (JAX without x64 silently computes in float32)."""
    out = result[0] if isinstance(result, tuple) else result
    if not is_array(out):
        return
    xp = namespace(out)
    if not xp.isdtype(out.dtype, "real floating"):
        return
    wanted = compute_dtype if compute_dtype is not None else "float64"
    wanted_text = wanted if isinstance(wanted, str) else _dtype_text(getattr(wanted, "__name__", wanted))
    if wanted_text == "float64" and _dtype_text(out.dtype) != "float64":
        hint = (" JAX computes in float32 unless x64 is enabled: call jax.config.update('jax_enable_x64', True) "
                "before creating arrays." if library_name(out) in ("jax", "jaxlib") else "")
        raise TypeError(f"{function_name}: {library_name(out)} returned {_dtype_text(out.dtype)} for a float64 "
                        f"computation; reflex never labels a lower-precision answer float64.{hint}")


LAYOUTS = ("bhld", "blhd")


def _swap_heads_and_length(x: Any) -> Any:
    """``(..., A, B, D)`` → ``(..., B, A, D)``: between reflex's (…, H, L, D) and flash-attn's (…, L, H, D)."""
    xp = namespace(x)
    axes = list(range(x.ndim))
    axes[-3], axes[-2] = axes[-2], axes[-3]
    return xp.permute_dims(x, tuple(axes))


def _with_layout_and_sinks(function_name: str, call: Callable[..., Any], args: tuple, kwargs: dict, layout: Any,
                           sinks: Any) -> Any:
    """Run ``call`` with q, k, v (the first three positional arrays) in reflex's layout and sinks merged."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'bhld' ((..., H, L, D), reflex's) or 'blhd' ((..., L, H, D), flash-attn's "
                         f"and JAX's); got {layout!r}")
    if layout == "blhd":
        for name, x in zip(("q", "k", "v"), args[:3]):
            _check_positional(name, x)
            if x.ndim < 3:
                raise ValueError(f"{name} must have shape (..., L, H, D) with layout='blhd'; got {tuple(x.shape)}")
        args = tuple(_swap_heads_and_length(x) for x in args[:3]) + tuple(args[3:])
        if is_array(kwargs.get("qv")):  # full_attention's qv (..., L, H, E) travels with q
            kwargs = {**kwargs, "qv": _swap_heads_and_length(kwargs["qv"])}
    want_lse = bool(kwargs.get("return_lse", False))
    if sinks is not None:
        q = args[0]
        _check_positional("q", q)
        _check_option_array("sinks", sinks, "q", q)
        heads = int(q.shape[-3])
        if tuple(sinks.shape) != (heads,):
            raise ValueError(f"sinks must have shape (H,) = ({heads},); got {tuple(sinks.shape)}")
        kwargs = {**kwargs, "return_lse": True}
    result = call(*args, **kwargs)
    if sinks is not None:
        from reflex.mechanisms._merge import add_sinks

        out, lse = result[0], result[1]
        xp = namespace(out)
        out, lse = add_sinks(xp, out, lse, xp.astype(sinks, out.dtype))
        result = (out, lse) if want_lse else out
    if layout == "blhd":
        result = (_swap_heads_and_length(result[0]), *result[1:]) if isinstance(result, tuple) else (
            _swap_heads_and_length(result))
    return result


_ENGINE_TERMS = ("mask", "bias", "softcap", "seqlens_q", "seqlens_k", "key_leftpad", "dropout_mask", "dropout_p")


def _run_with_terms(function_name: str, run: Callable[..., Any], terms: dict, *args: Any, **kwargs: Any) -> Any:
    """``run(*args, **kwargs)`` with the engine options the mechanism does not declare itself appended to its
    engine calls (:mod:`reflex.mechanisms._engine.extra`); q, k are the first two positional arrays, in
    reflex's layout."""
    from reflex.mechanisms._engine.extra import ExtraTerms, extra_terms

    if len(args) < 2:
        raise TypeError(f"{function_name}: q and k must be passed positionally")
    q, k = args[0], args[1]
    _check_positional("q", q)
    _check_positional("k", k)
    if q.ndim < 3 or k.ndim < 3:
        raise ValueError(f"{function_name}: q and k must have shape (..., H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    values = {}
    for name, value in terms.items():
        if value is None:
            continue
        if name == "softcap":
            values[name] = BY_NAME["softcap"].check(name, value)
            continue
        if name == "dropout_p":  # a rate in [0, 1), checked with the mask by the kernels (check_dropout)
            values[name] = value
            continue
        _check_option_array(name, value, "q", q)
        values[name] = value
    spec = ExtraTerms(function_name, tuple(int(n) for n in q.shape[:-3]), int(q.shape[-3]), int(q.shape[-2]),
                      int(k.shape[-2]), **values)
    with extra_terms(spec):
        return run(*args, **kwargs)


def typed_options(*, engine_options: bool | str | None = None, **specs: Spec) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a public mechanism function: check its arrays and options (see the module docstring).

    ``specs`` add or override :data:`BY_NAME` entries for this function's keyword options.

    Functions whose first positional arrays are ``q, k, v`` also get ``layout="bhld" | "blhd"`` (q, k, v
    and the output in ``(..., H, L, D)`` or flash-attn's ``(..., L, H, D)``; masks, biases and lse keep
    reflex's order) and, when they can return an lse, ``sinks (H,)``: per-head logits merged into each
    row's softmax denominator as a partial with lse ``s_h`` and output 0 (the returned lse includes
    them). ``engine_options=False`` leaves both out (functions with their own layout); ``"layout"`` leaves
    out the sinks (a function whose lse is not its output rows' softmax normaliser, or is not second).
    """

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(function)
        parameters = signature.parameters
        positional = [n for n, p in parameters.items() if p.kind is inspect.Parameter.POSITIONAL_ONLY
                      and p.annotation not in ("int", int)]  # alibi_slopes(num_heads, /): a count, not an array
        table = {name: spec for name, spec in {**BY_NAME, **specs}.items() if name in parameters}
        table.update({n: Int(minimum=0) for n, p in parameters.items() if p.annotation in ("int", int) and n not in table})
        has_alignment = "alignment" in parameters
        qkv = positional[:3] == ["q", "k", "v"] and engine_options is not False
        adds_layout = qkv and "layout" not in parameters
        adds_sinks = qkv and engine_options != "layout" and "return_lse" in parameters and "sinks" not in parameters
        # the engine's own options (mask, bias, softcap, padded lengths) on every engine mechanism lacking them
        adds_terms = [n for n in _ENGINE_TERMS if n not in parameters] if (
            qkv and engine_options != "layout" and "return_lse" in parameters) else []

        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"{function.__name__}: {err}") from None
            values = bound.arguments
            anchor_name = None
            for name in positional:
                if name not in values or values[name] is None and parameters[name].default is None:
                    continue  # an optional positional array left out
                _check_positional(name, values[name])
                anchor_name = anchor_name or name
            for name, spec in table.items():
                if name in values:
                    values[name] = spec.check(name, values[name])
            if has_alignment and isinstance(values.get("causal"), str):
                explicit = values.get("alignment", parameters["alignment"].default)
                if "alignment" in values and explicit != values["causal"]:
                    raise ValueError(f"causal={values['causal']!r} conflicts with alignment={explicit!r}: pass "
                                     f"causal=True with alignment=..., or one string causal")
                values["alignment"] = values["causal"]
                values["causal"] = True
            if anchor_name is not None:
                anchor = values[anchor_name]
                for name, value in values.items():
                    if name in positional or not (is_array(value) or _is_masked_array(value)):
                        continue
                    _check_option_array(name, value, anchor_name, anchor)
                for name in positional:
                    value = values.get(name)
                    if value is not None and name != anchor_name and is_array(value):
                        if library_name(value) != library_name(anchor):
                            raise TypeError(f"arrays come from different array libraries: {name} from "
                                            f"{library_name(value)}, {anchor_name} from {library_name(anchor)}")
            result = function(*bound.args, **bound.kwargs)
            arrays = {name: value for name, value in values.items() if _arrays_in(value)}
            if arrays:
                _overflow_guard(function.__name__, arrays, result)
                if "compute_dtype" in parameters:
                    _check_output_dtype(function.__name__, values.get("compute_dtype"), result)
            return result

        @functools.wraps(function)
        def checked(*args: Any, **kwargs: Any) -> Any:
            layout = kwargs.pop("layout", "bhld") if adds_layout else "bhld"
            sinks = kwargs.pop("sinks", None) if adds_sinks else None
            terms = {n: kwargs.pop(n) for n in adds_terms if n in kwargs}
            if any(value is not None for value in terms.values()):
                inner = functools.partial(_run_with_terms, function.__name__, run, terms)
                if layout == "bhld" and sinks is None:
                    return inner(*args, **kwargs)
                return _with_layout_and_sinks(function.__name__, inner, args, kwargs, layout, sinks)
            if layout == "bhld" and sinks is None:
                return run(*args, **kwargs)
            return _with_layout_and_sinks(function.__name__, run, args, kwargs, layout, sinks)

        extra = []
        if adds_layout:
            extra.append(inspect.Parameter("layout", inspect.Parameter.KEYWORD_ONLY, default="bhld", annotation="str"))
        if adds_sinks:
            extra.append(inspect.Parameter("sinks", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Any"))
        extra.extend(inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Any")
                     for n in adds_terms)
        checked.__signature__ = signature.replace(parameters=[*parameters.values(), *extra])  # type: ignore[attr-defined]
        checked.generic_terms = tuple(adds_terms)  # type: ignore[attr-defined]
        checked.generic_sinks = adds_sinks  # type: ignore[attr-defined]  (reflex.vjp differentiates them)
        checked.generic_layout = adds_layout  # type: ignore[attr-defined]
        return checked

    return decorate
