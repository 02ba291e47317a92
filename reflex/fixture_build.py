"""Planning and building fixture cases, shared by :func:`reflex.fixtures.generate` and :func:`reflex.fixtures.verify`.

Arguments are normalised here (sorted, deduplicated, validated), shape overrides reach the case
builders through :func:`reflex.mechanisms._cases.case_shape`, and each case becomes its manifest
entry and its members (inputs, outputs, lse, and for a mechanism with a VJP the seeded cotangents
and gradients). Format: ``docs/fixtures.md``.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence


import reflex
from reflex import registry
from reflex.backends import npz, safetensors_file
from reflex.fixture_schema import FORMATS, MANIFEST, SHAPE_LETTERS, SHAPE_OPTIONS, FixtureError
from reflex.mechanisms._cases import case_shape
from reflex.testing import TOLERANCES
from reflex.backends import numpy_namespace

hnp = numpy_namespace()  # host NumPy (files, long double), through the backends layer

DEFAULT_SIZES = ("tiny", "small")
DIGEST_FILE = MANIFEST + ".sha256"  # the set digest in `sha256sum -c` format, written beside the manifest
_COTANGENT_SEED = 7919  # d_out is drawn from stream (seed, 7919, 1), d_lse from (seed, 7919, 2)


def case_id(key: str, variant: str, size: str, shape: Mapping[str, int] | None = None) -> str:
    """``<key>-<variant>-<n>[-<shape>]``: n the index of ``size`` in ``SIZES``, shape e.g. ``L128_D64``;
    characters outside [A-Za-z0-9_] in the variant → ``_``."""
    base = f"{key}-{re.sub(r'[^A-Za-z0-9_]', '_', variant)}-{registry.SIZES.index(size)}"
    return f"{base}-{_shape_tag(shape)}" if shape else base


def _shape_tag(shape: Mapping[str, int]) -> str:
    return "_".join(f"{letter}{shape[letter]}" for letter in SHAPE_LETTERS if letter in shape)


# ----------------------------------------------------------------------------------------------- arguments


def _jsonable(value: Any, what: str) -> Any:
    """``value`` as it reads back from JSON (tuples → lists); non-JSON values raise FixtureError."""
    def default(x: Any) -> Any:
        if isinstance(x, (hnp.bool_, hnp.integer, hnp.floating)):
            return x.item()
        raise TypeError(f"{type(x).__name__} is not JSON-able")

    try:
        return json.loads(json.dumps(value, default=default, allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise FixtureError(f"{what} must be JSON-able (finite numbers, strings, lists, dicts): {err}") from None


def _select(mechanisms: Iterable[str] | None) -> list[registry.Mechanism]:
    if mechanisms is None:
        return sorted(registry.list_mechanisms(), key=lambda m: m.key)
    if isinstance(mechanisms, str):
        mechanisms = [mechanisms]
    keys = sorted(dict.fromkeys(mechanisms))
    if not keys:
        raise ValueError("mechanisms is empty; pass None for every registered mechanism")
    return [registry.get(key) for key in keys]  # an unknown key raises KeyError with close matches


def _sizes(sizes: Sequence[str] | str) -> list[str]:
    sizes = list(dict.fromkeys([sizes] if isinstance(sizes, str) else sizes))
    if not sizes:
        raise ValueError("sizes is empty")
    sizes.sort(key=lambda s: (registry.size_scale(s), s))  # validates each size
    return sizes


def _shapes(shapes: Mapping[str, Iterable[int]] | None) -> dict[str, list[int]]:
    """Validated shape options, each a sorted list of distinct positive ints (order-insensitive)."""
    if shapes is None:
        return {}
    if not isinstance(shapes, Mapping):
        raise TypeError(f"shapes must be a mapping of {', '.join(SHAPE_OPTIONS)} to lists of ints; "
                        f"got {type(shapes).__name__}")
    result = {}
    for option, values in shapes.items():
        if option not in SHAPE_OPTIONS:
            raise ValueError(f"shapes: unknown option {option!r}; expected one of {', '.join(SHAPE_OPTIONS)}")
        values = [values] if isinstance(values, int) else list(values)
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"shapes[{option!r}] must be a non-empty list of positive ints; got {values!r}")
        result[option] = sorted(set(values))
    for heads, kv in itertools.product(result.get("heads", [4]), result.get("kv_heads", [])):
        if heads % kv:
            raise ValueError(f"kv heads {kv} do not divide query heads {heads} (shapes heads × kv_heads)")
    return {option: result[option] for option in SHAPE_OPTIONS if option in result}


def _grid(shapes: Mapping[str, list[int]]) -> list[dict[str, int]]:
    """Every combination of the shape options as ``case_shape`` letters; ``[{}]`` without options."""
    letters = [SHAPE_OPTIONS[option] for option in shapes]
    return [dict(zip(letters, values)) for values in itertools.product(*shapes.values())]


def _dtypes(dtypes: Iterable[str] | None) -> list[str]:
    if dtypes is None:
        return list(TOLERANCES)
    chosen = [dtypes] if isinstance(dtypes, str) else list(dtypes)
    unknown = [d for d in chosen if d not in TOLERANCES]
    if unknown or not chosen:
        raise ValueError(f"dtypes must be a non-empty list among {', '.join(TOLERANCES)}; got {chosen!r}")
    return [d for d in TOLERANCES if d in chosen]


# ----------------------------------------------------------------------------------------------- building


def _canonical(array: Any, what: str) -> hnp.ndarray:
    """:func:`reflex.backends.npz.canonical`, its refusal raised as :class:`FixtureError`."""
    try:
        return npz.canonical(array, what)
    except npz.NpzError as err:
        raise FixtureError(str(err)) from None


_npz_bytes = npz.npz_bytes  # kept under its old name: tests build consistent but wrong case files with it


def _file_bytes(members: Sequence[tuple[str, hnp.ndarray]], fmt: str) -> bytes:
    return npz.npz_bytes(members) if fmt == "npz" else safetensors_file.safetensors_bytes(members)


def _case_inputs(case: registry.Case, cid: str) -> list[tuple[str, hnp.ndarray]]:
    """The input members of one case file, sorted by name."""
    members = []
    for name in sorted(case.inputs):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise FixtureError(f"case {cid}: input name {name!r} is not an identifier")
        members.append((f"input.{name}", _canonical(case.inputs[name], f"case {cid}: input {name}")))
    return members


def _case_outputs(mechanism: registry.Mechanism, case: registry.Case, cid: str) -> list[tuple[str, hnp.ndarray]]:
    """The output members of one case file: output, further outputs ``output.<i>``, lse, then (for a
    mechanism with a VJP) d_out, d_lse and ``grad.<name>`` for every floating input, sorted by name."""
    try:
        result = case.call(mechanism, **({"return_lse": True} if mechanism.returns_lse else {}))
    except Exception as err:
        raise FixtureError(f"case {cid}: {mechanism.key} failed on its own case: {type(err).__name__}: {err}") from err
    parts = list(result) if isinstance(result, tuple) else [result]
    output = _canonical(parts[0], f"case {cid}: output")
    members = [("output", output)]
    lse = None
    if mechanism.returns_lse:
        if len(parts) < 2:
            raise FixtureError(f"case {cid}: {mechanism.key} has returns_lse=True but return_lse=True gave no (out, lse) tuple")
        lse = _canonical(parts[1], f"case {cid}: lse")
        if sorted(lse.shape) != sorted(output.shape[:-1]):  # flash-attn layouts order (H, L) differently
            raise FixtureError(f"case {cid}: lse has shape {lse.shape}; expected the output's {output.shape[:-1]} "
                               f"(in some order)")
        parts = parts[:1] + parts[2:]
    for i, extra in enumerate(parts[1:], start=1):
        members.append((f"output.{i}", _canonical(extra, f"case {cid}: output {i}")))
    if lse is not None:
        members.append(("lse", lse))
    if mechanism.vjp is not None:
        members += _case_gradients(mechanism, case, cid, output, lse)
    return members


def _case_gradients(mechanism: registry.Mechanism, case: registry.Case, cid: str, output: hnp.ndarray,
                    lse: hnp.ndarray | None) -> list[tuple[str, hnp.ndarray]]:
    """Seeded cotangents and :func:`reflex.vjp`'s gradients for one case (host float64); none when the
    VJP raises ``NotImplementedError`` for the case's options."""
    from reflex import random

    d_out = random.normal(output.shape, seed=(case.seed, _COTANGENT_SEED, 1))
    members = [("d_out", d_out)]
    d_lse = None
    if lse is not None:
        d_lse = random.normal(lse.shape, seed=(case.seed, _COTANGENT_SEED, 2))
        members.append(("d_lse", d_lse))
    try:
        grads = reflex.vjp(mechanism.key, dict(case.inputs), d_out, d_lse=d_lse, **case.params)
    except NotImplementedError:  # the VJP does not cover this case's options: the case carries no gradients
        return []
    except Exception as err:
        raise FixtureError(f"case {cid}: {mechanism.key}'s VJP failed on its own case: {type(err).__name__}: {err}") from err
    for name in sorted(grads):
        members.append((f"grad.{name}", _canonical(grads[name], f"case {cid}: gradient of {name}")))
    return members


def _shape_problem(case: registry.Case, shape: Mapping[str, int], output: hnp.ndarray | None) -> str | None:
    """Why ``case`` does not have the requested ``shape`` (None when it has): q (or qk) must be
    (B, H, L, D), k and v (…, G or H, L, D) — (B, L, H, D) and (…, L, G or H, D) for a case with
    ``layout="blhd"`` — and the output keep q's batch axes and length."""
    q = case.inputs.get("q", case.inputs.get("qk"))
    if q is None or getattr(q, "ndim", 0) < 3:
        return "its case has no (…, H, L, D) query input q to shape"
    heads, length = (-2, -3) if case.params.get("layout") == "blhd" else (-3, -2)
    want = {"B": (q.shape[:-3], (shape.get("B"),)), "H": (q.shape[heads], shape.get("H")),
            "L": (q.shape[length], shape.get("L")), "D": (q.shape[-1], shape.get("D"))}
    for name in ("k", "v"):
        x = case.inputs.get(name)
        if x is not None and getattr(x, "ndim", 0) >= 3:
            want[f"{name}.L"] = (x.shape[length], shape.get("L"))
            want[f"{name}.D"] = (x.shape[-1], shape.get("D"))
            if "G" in shape:  # the requested kv heads, or one kv head per query head (MHA variants)
                want[f"{name}.G"] = (x.shape[heads] in (shape["G"], q.shape[heads]), True)
    for what, (got, expected) in want.items():
        if expected is not None and expected != (None,) and got != expected:
            shapes = ", ".join(f"{n} {tuple(a.shape)}" for n, a in sorted(case.inputs.items()) if n in ("q", "qk", "k", "v"))
            return f"its case builder does not build the requested shape {_shape_tag(shape)} ({shapes})"
    if output is not None and (output.ndim != q.ndim or output.shape[:-3] != q.shape[:-3]
                               or output.shape[length] != q.shape[length]):
        return f"its output {tuple(output.shape)} does not follow the query's batch and length {tuple(q.shape)}"
    return None


@dataclass
class _Plan:
    """Cases to compute in order, and the cases skipped (with the reason) at overridden shapes."""

    cases: list[tuple[str, str, dict[str, int], registry.Mechanism, registry.Case]]
    skipped: list[dict[str, Any]]


def _skip(mechanism: str, size: str, shape: Mapping[str, int], variant: str | None, reason: str) -> dict[str, Any]:
    return {"mechanism": mechanism, "size": size, "shape": dict(shape), "variant": variant, "reason": reason}


def _plan(chosen: Sequence[registry.Mechanism], sizes: Sequence[str], seed: int, grid: Sequence[dict[str, int]]) -> _Plan:
    plan = _Plan([], [])
    seen: dict[str, str] = {}
    for mechanism in chosen:
        for size in sizes:
            for shape in grid:
                try:
                    with case_shape(**shape):
                        cases = mechanism.cases(size, seed)
                except Exception as err:
                    if not shape:
                        raise FixtureError(f"{mechanism.key}: its case builder failed at size {size}, seed {seed}: "
                                           f"{type(err).__name__}: {err}") from err
                    plan.skipped.append(_skip(mechanism.key, size, shape, None, f"its case builder refused the shape: "
                                                                               f"{type(err).__name__}: {err}"))
                    continue
                for case in cases:
                    problem = _shape_problem(case, shape, None) if shape else None
                    if problem:
                        plan.skipped.append(_skip(mechanism.key, size, shape, case.variant, problem))
                        continue
                    cid = case_id(mechanism.key, case.variant, size, shape)
                    if cid in seen:
                        raise FixtureError(f"case {cid}: two cases map to this id (variants {seen[cid]!r} and "
                                           f"{case.variant!r})")
                    seen[cid] = case.variant
                    plan.cases.append((cid, size, shape, mechanism, case))
    return plan


def _build(cid: str, size: str, shape: dict[str, int], mechanism: registry.Mechanism, case: registry.Case,
           dtypes: Sequence[str], fmt: str) -> tuple[dict[str, Any], list[tuple[str, hnp.ndarray]]] | str:
    """``(entry without bytes/sha256, members)`` of one case, or the reason to skip it (shapes only)."""
    try:
        members = _case_inputs(case, cid) + _case_outputs(mechanism, case, cid)
    except FixtureError as err:
        if not shape:
            raise
        cause = err.__cause__ if err.__cause__ is not None else err
        return f"{type(cause).__name__}: {cause}"
    if shape:
        problem = _shape_problem(case, shape, dict(members)["output"])
        if problem:
            return problem
    entry = {
        "id": cid,
        "mechanism": mechanism.key,
        "variant": case.variant,
        "size": size,
        "shape": dict(shape),
        "seed": case.seed,
        "params": _jsonable(dict(case.params), f"case {cid}: params"),
        "positional": list(case.positional),
        "file": f"{cid}{FORMATS[fmt]}",
        "arrays": {name: {"dtype": a.dtype.name, "shape": list(a.shape)} for name, a in members},
        "tolerances": {name: {"atol": TOLERANCES[name].atol, "rtol": TOLERANCES[name].rtol} for name in dtypes},
        "paper": mechanism.paper,
    }
    return entry, members


def _skip_order(chosen: Sequence[registry.Mechanism], sizes: Sequence[str], grid: Sequence[dict[str, int]]
                ) -> list[tuple[str, str, str]]:
    return [(m.key, size, _shape_tag(shape)) for m in chosen for size in sizes for shape in grid]
