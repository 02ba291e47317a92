"""Recording the engine calls of a forward, and the shared VJP of engine mechanisms built on it.

Most mechanisms validate q, k, v with ``prepare`` and make one engine call (:func:`dense`,
:func:`tiled` or :func:`gather`) with masks and biases that encode their pattern. Their VJP is
that call's backward, so one piece of code serves them all: :func:`engine_vjp` runs the forward
inside :func:`recording`, finds the one engine call whose result the mechanism returned, runs the
call's backward, and maps the gradients back to the mechanism's inputs:

- ``dq``, ``dk``, ``dv`` to the positional inputs named ``q``, ``k``, ``v`` (another positional
  name, e.g. a shared ``qk``, receives every role it plays), which the call must have received
  unchanged (up to the compute-dtype cast);
- ``d_bias`` of an array bias term to the floating keyword input it was built from;
- the parameter gradients of a *differentiable callable term* (``term.params`` holds the input
  arrays, see the package docstring) to those inputs.

Whatever cannot be mapped — a second engine call, a transformed q/k/v, a post-processed output, a
floating input that no term reads — raises ``NotImplementedError`` naming it: never a silently
wrong gradient. Selections (top-k, hashing, routing, random draws) are taken as constants: the
recorded call carries them as masks or index lists.
"""

from __future__ import annotations

import contextvars
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from reflex.mechanisms._inputs import Prepared

__all__ = ["EngineCall", "recording", "record", "record_opaque", "engine_vjp"]

_CALLS: contextvars.ContextVar[list | None] = contextvars.ContextVar("reflex_engine_calls", default=None)


@dataclass(frozen=True)
class EngineCall:
    """One engine call: the kernel (``"dense"``, ``"tiled"``, ``"gather"``, or the name of a function
    whose result has no engine backward, such as ``"scores"``), its inputs and its result."""

    kernel: str
    p: Prepared | None
    options: Mapping[str, Any] = field(default_factory=dict)
    indices: Any = None
    out: Any = None
    lse: Any = None

    def backward(self, d_out: Any, d_lse: Any = None) -> Any:
        """The kernel's backward at the recorded result (``Gradients``)."""
        from reflex.mechanisms._engine.dense import dense_backward
        from reflex.mechanisms._engine.gather import gather_backward
        from reflex.mechanisms._engine.tiled import tiled_backward

        if self.kernel == "dense":
            return dense_backward(self.p, self.out, self.lse, d_out, d_lse, **self.options)
        if self.kernel == "tiled":
            return tiled_backward(self.p, self.out, self.lse, d_out, d_lse, **self.options)
        if self.kernel == "gather":
            return gather_backward(self.p, self.indices, self.out, self.lse, d_out, d_lse, **self.options)
        raise NotImplementedError(f"the engine function {self.kernel!r} has no backward")


@contextmanager
def recording() -> Iterator[list[EngineCall]]:
    """Collect every engine call made (on this thread) inside the ``with`` block."""
    calls: list[EngineCall] = []
    token = _CALLS.set(calls)
    try:
        yield calls
    finally:
        _CALLS.reset(token)


def record(kernel: str, p: Prepared, options: Mapping[str, Any], result: tuple[Any, Any], indices: Any = None) -> None:
    """Called by each kernel with its result; a no-op outside :func:`recording`."""
    calls = _CALLS.get()
    if calls is not None:
        calls.append(EngineCall(kernel, p, dict(options), indices, result[0], result[1]))


def record_opaque(name: str) -> None:
    """Called by engine functions whose result has no backward (``scores``, ``weights``)."""
    calls = _CALLS.get()
    if calls is not None:
        calls.append(EngineCall(name, None))


# --- the shared VJP --------------------------------------------------------------------------------

_BAND_CHOICES = ("auto", "numpy", "numba")


def engine_vjp(function: Callable[..., Any], *, implementation: Callable[[int, int, Any], Any] | None = None,
               constants: tuple[str, ...] = (), selection_calls: bool = False,
               name: str | None = None) -> Callable[..., dict[str, Any]]:
    """The VJP of a mechanism whose forward is one engine call (see the module docstring).

    ``constants``: inputs that only *select* (importance scores, indexer projections, centroids,
    hash projections): the selection is piecewise constant, so their gradient is 0 (returned as
    zeros). ``selection_calls``: the forward may also call :func:`scores`/:func:`weights` to select
    keys (top-k); those calls are constants too.

    ``implementation(L, S, requested)`` picks the ``implementation=`` the VJP's forward runs with
    (default: ``"dense"`` when one head's L·S fits :data:`AUTO_TILED_ELEMENTS`, else ``"tiled"``,
    in place of ``"auto"``, ``"numpy"`` or ``"numba"`` — the band kernels have no backward); it is
    used only when ``function`` takes ``implementation``.
    """
    label = name or function.__name__

    def vjp(inputs: Mapping[str, Any], d_out: Any, *, d_lse: Any = None, **params: Any) -> dict[str, Any]:
        result, calls = run_recorded(function, inputs, params, return_lse=d_lse is not None,
                                     implementation=implementation)
        positional = positional_names(function)
        out = result[0] if d_lse is not None else result
        found = [c for c in calls if c.out is out]
        engine = [c for c in calls if c.p is not None or not selection_calls]
        if len(engine) != 1 or not found or found[0].p is None:
            kinds = ", ".join(c.kernel for c in calls) or "none"
            raise NotImplementedError(f"{label}: the shared engine VJP needs the output to be one engine call's "
                                      f"result; this forward made {len(calls)} engine call(s) ({kinds}) "
                                      f"with these options")
        call = found[0]
        if d_lse is not None and result[1] is not call.lse:
            raise NotImplementedError(f"{label}: the returned lse is not the engine call's")
        grads = call.backward(d_out, d_lse)
        return _map_gradients(label, call, grads, inputs, positional, constants)

    vjp.shared_engine = True  # type: ignore[attr-defined]  (takes the generic mask/bias/softcap: extra.py)
    vjp.__doc__ = (f"VJP of :func:`{label}` through the engine's backward (shared, see "
                   f":func:`reflex.mechanisms._engine.record.engine_vjp`).")
    return vjp


def positional_names(function: Callable[..., Any]) -> list[str]:
    """The positional-only parameters of ``function`` (its array arguments q, k, v, ...)."""
    parameters = inspect.signature(function).parameters
    return [n for n, prm in parameters.items() if prm.kind is inspect.Parameter.POSITIONAL_ONLY]


def run_recorded(function: Callable[..., Any], inputs: Mapping[str, Any], params: Mapping[str, Any], *,
                 return_lse: bool, implementation: Callable[[int, int, Any], Any] | None = None
                 ) -> tuple[Any, list[EngineCall]]:
    """``function(*positional inputs, **keyword inputs, **params)`` inside :func:`recording`.

    The band kernels (``"numpy"``, ``"numba"``, and ``"auto"`` where it would pick them) have no
    backward: when ``function`` takes ``implementation``, the run uses ``implementation(L, S,
    requested)`` (default: the engine's choice, dense or tiled, in place of those three).
    """
    from reflex.mechanisms._engine import choose_implementation

    positional = positional_names(function)
    missing = [n for n in positional if n not in inputs]
    if missing:
        raise TypeError(f"{function.__name__}: inputs lacks the positional argument(s) {', '.join(missing)}")
    params = dict(params)
    params.pop("return_lse", None)
    if "implementation" in inspect.signature(function).parameters:
        first = inputs[positional[0]]
        keys = inputs.get("k", first)
        requested = params.get("implementation", "auto")
        length, key_length = int(first.shape[-2]), int(keys.shape[-2])
        if implementation is not None:
            params["implementation"] = implementation(length, key_length, requested)
        elif requested in _BAND_CHOICES:
            params["implementation"] = choose_implementation(length, key_length)
    args = [inputs[n] for n in positional]
    kwargs = {n: x for n, x in inputs.items() if n not in positional}
    with recording() as calls:
        result = function(*args, **kwargs, **params, **({"return_lse": True} if return_lse else {}))
    return result, calls


def _same(xp: Any, a: Any, b: Any) -> bool:
    """Whether ``b`` is ``a`` or holds ``a``'s values after the compute-dtype cast (NaN equal to NaN)."""
    if a is b:
        return True
    if not hasattr(a, "shape") or tuple(a.shape) != tuple(b.shape):
        return False
    try:
        a = xp.astype(a, b.dtype)
    except Exception:  # a different library: not the same array
        return False
    equal = (a == b) | (xp.isnan(a) & xp.isnan(b)) if xp.isdtype(b.dtype, "real floating") else a == b
    return bool(xp.all(equal))


def _map_gradients(label: str, call: EngineCall, grads: Any, inputs: Mapping[str, Any],
                   positional: list[str], constants: tuple[str, ...]) -> dict[str, Any]:
    p = call.p
    xp = p.xp
    roles = {"q": (p.q, grads.dq), "k": (p.k, grads.dk), "v": (p.v, grads.dv)}
    from reflex.mechanisms._engine.terms import _as_tuple, is_array_term

    bias_terms = _as_tuple(call.options.get("bias"))
    result: dict[str, Any] = {}
    for name, x in inputs.items():
        if not hasattr(x, "dtype") or not xp.isdtype(x.dtype, "real floating"):
            continue
        if name in constants:
            result[name] = xp.zeros(x.shape, dtype=p.q.dtype, device=p.device)
            continue
        parts = []
        if name in roles:
            prepared, g = roles[name]
            if not _same(xp, x, prepared):
                raise NotImplementedError(f"{label}: {name} reaches the engine transformed; the shared VJP cannot "
                                          f"differentiate the transformation")
            parts.append(g)
        elif name in positional:  # e.g. a shared qk: every role it plays
            parts.extend(g for prepared, g in roles.values() if _same(xp, x, prepared))
        for term, g in zip(bias_terms, grads.bias):
            if g is None:
                continue
            if is_array_term(term):
                if name not in roles and _same(xp, x, term):
                    parts.append(g)
            else:
                for param_name, value in getattr(term, "params", {}).items():
                    if (value is x or _same(xp, x, value)) and param_name in g:
                        parts.append(g[param_name])
        if not parts:
            raise NotImplementedError(f"{label}: no gradient for input {name!r}: the engine call does not read it "
                                      f"as q, k, v, an array bias or a differentiable term's parameter")
        total = parts[0]
        for g in parts[1:]:
            total = total + g
        result[name] = total
    return result
