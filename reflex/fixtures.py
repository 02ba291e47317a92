"""Golden fixtures: write, load, verify and check sets of reference cases (format: ``docs/fixtures.md``).

A *fixture set* is a folder holding one case file per case (``<id>.npz``, or ``<id>.safetensors``
with ``format="safetensors"``) and a ``manifest.json`` (schema 2, :mod:`reflex.fixture_schema`).
Cases come from the registry's case builders (``Mechanism.cases(size, seed)``), so every registered
mechanism flows through without code here. Case id: ``<key>-<variant>-<n>`` with ``n`` the index
of the size in :data:`reflex.registry.SIZES` (tiny 0, small 1, medium 2, large 3), followed by
``-<shape>`` (e.g. ``-L128_D64``) for cases built at overridden shapes.

Each case file holds ``input.<name>`` for every input (every random array included), ``output``
(the mechanism's output, or the first element of a returned tuple), ``output.<i>`` for further
tuple elements, ``lse`` for mechanisms that return it, and, for a mechanism with a VJP
(``Mechanism.vjp``), the seeded cotangent ``d_out`` (and ``d_lse``) with ``grad.<name>``, the
gradient of ``⟨d_out, output⟩ + ⟨d_lse, lse⟩`` for every floating input.

Shape overrides (``shapes={"lengths": [127, 128], "head_dims": [64]}``) reach the case builders
through :func:`reflex.mechanisms._cases.case_shape`; a case whose builder, call or shapes do not
honour a requested shape is *skipped* (never adjusted) and listed with its reason in the manifest's
``skipped``.

Guarantees:

- *Deterministic*: the same mechanisms, sizes, shapes, dtypes, format and seed give byte-identical
  files (fixed zip entry dates and attributes, no compression, canonical safetensors headers; the
  manifest is canonical JSON). Gradients are seeded and computed like outputs: same seed → same bytes.
- *Tamper-evident*: :func:`digest` (the *set digest*, SHA-256 of the canonical manifest) pins the
  whole set; :func:`verify` rebuilds the manifest from the registry and reports every field that
  differs.
- *Safe to load*: nothing is unpickled, file names cannot leave the folder, sizes and nesting are
  bounded before parsing, every file's sha256 is checked before it is parsed, and any malformed
  input raises :class:`FixtureError` naming the case or field.

This module writes (:func:`generate`) and recomputes (:func:`verify`); reading lives in
:mod:`reflex.fixture_set`, the schema in :mod:`reflex.fixture_schema`, comparing exported outputs in
:mod:`reflex.fixture_check`. Import everything from here: their public names are re-exported.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy

import reflex
from reflex import registry
from reflex.backends import npz, safetensors_file
from reflex.fixture_check import CheckReport, CheckResult, check
from reflex.fixture_schema import (FORMATS, MANIFEST, SCHEMA_VERSION, SHAPE_LETTERS, SHAPE_OPTIONS, canonical_bytes,
                                   digest)
from reflex.fixture_set import FixtureCase, FixtureError, FixtureSet, load
from reflex.mechanisms._cases import case_shape
from reflex.testing import TOLERANCES, Tolerance, _outside

__all__ = [
    "SCHEMA_VERSION", "MANIFEST", "DEFAULT_SIZES", "FORMATS", "DIGEST_FILE", "FixtureError", "FixtureCase",
    "FixtureSet", "generate", "load", "verify", "check", "case_id", "digest", "CaseVerification", "VerifyReport",
    "CheckResult", "CheckReport",
]

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
        if isinstance(x, (numpy.bool_, numpy.integer, numpy.floating)):
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


def _canonical(array: Any, what: str) -> numpy.ndarray:
    """:func:`reflex.backends.npz.canonical`, its refusal raised as :class:`FixtureError`."""
    try:
        return npz.canonical(array, what)
    except npz.NpzError as err:
        raise FixtureError(str(err)) from None


_npz_bytes = npz.npz_bytes  # kept under its old name: tests build consistent but wrong case files with it


def _file_bytes(members: Sequence[tuple[str, numpy.ndarray]], fmt: str) -> bytes:
    return npz.npz_bytes(members) if fmt == "npz" else safetensors_file.safetensors_bytes(members)


def _case_inputs(case: registry.Case, cid: str) -> list[tuple[str, numpy.ndarray]]:
    """The input members of one case file, sorted by name."""
    members = []
    for name in sorted(case.inputs):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise FixtureError(f"case {cid}: input name {name!r} is not an identifier")
        members.append((f"input.{name}", _canonical(case.inputs[name], f"case {cid}: input {name}")))
    return members


def _case_outputs(mechanism: registry.Mechanism, case: registry.Case, cid: str) -> list[tuple[str, numpy.ndarray]]:
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
        if lse.shape != output.shape[:-1]:
            raise FixtureError(f"case {cid}: lse has shape {lse.shape}; expected the output's {output.shape[:-1]}")
        parts = parts[:1] + parts[2:]
    for i, extra in enumerate(parts[1:], start=1):
        members.append((f"output.{i}", _canonical(extra, f"case {cid}: output {i}")))
    if lse is not None:
        members.append(("lse", lse))
    if mechanism.vjp is not None:
        members += _case_gradients(mechanism, case, cid, output, lse)
    return members


def _case_gradients(mechanism: registry.Mechanism, case: registry.Case, cid: str, output: numpy.ndarray,
                    lse: numpy.ndarray | None) -> list[tuple[str, numpy.ndarray]]:
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


def _shape_problem(case: registry.Case, shape: Mapping[str, int], output: numpy.ndarray | None) -> str | None:
    """Why ``case`` does not have the requested ``shape`` (None when it has): q (or qk) must be
    (B, H, L, D), k and v (…, G or H, L, D), and the output keep q's batch axes and length."""
    q = case.inputs.get("q", case.inputs.get("qk"))
    if q is None or getattr(q, "ndim", 0) < 3:
        return "its case has no (…, H, L, D) query input q to shape"
    want = {"B": (q.shape[:-3], (shape.get("B"),)), "H": (q.shape[-3], shape.get("H")),
            "L": (q.shape[-2], shape.get("L")), "D": (q.shape[-1], shape.get("D"))}
    for name in ("k", "v"):
        x = case.inputs.get(name)
        if x is not None and getattr(x, "ndim", 0) >= 3:
            want[f"{name}.L"] = (x.shape[-2], shape.get("L"))
            want[f"{name}.D"] = (x.shape[-1], shape.get("D"))
            if "G" in shape:  # the requested kv heads, or one kv head per query head (MHA variants)
                want[f"{name}.G"] = (x.shape[-3] in (shape["G"], q.shape[-3]), True)
    for what, (got, expected) in want.items():
        if expected is not None and expected != (None,) and got != expected:
            shapes = ", ".join(f"{n} {tuple(a.shape)}" for n, a in sorted(case.inputs.items()) if n in ("q", "qk", "k", "v"))
            return f"its case builder does not build the requested shape {_shape_tag(shape)} ({shapes})"
    if output is not None and (output.ndim != q.ndim or output.shape[:-3] != q.shape[:-3]
                               or output.shape[-2] != q.shape[-2]):
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
           dtypes: Sequence[str], fmt: str) -> tuple[dict[str, Any], list[tuple[str, numpy.ndarray]]] | str:
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


def generate(out_dir: str | os.PathLike[str], mechanisms: Iterable[str] | None = None,
             sizes: Sequence[str] = DEFAULT_SIZES, seed: int = 0, *, progress: bool = False,
             shapes: Mapping[str, Iterable[int]] | None = None, dtypes: Iterable[str] | None = None,
             format: str = "npz", certify: bool = False) -> dict[str, Any]:
    """Write a fixture set for ``mechanisms`` (default: every registered one) at ``sizes`` into ``out_dir``.

    Args:
        shapes: shape overrides on top of each named size, option → list of values: ``lengths``
            (L = S), ``head_dims`` (D = E), ``heads`` (H), ``kv_heads`` (G, dividing H), ``batch``
            (B); every combination is generated. A case that cannot take a combination is skipped
            (listed with its reason in the manifest's ``skipped``), never adjusted.
        dtypes: the dtypes whose tolerances are recorded (default: every row of
            :data:`reflex.testing.TOLERANCES`).
        format: ``"npz"`` or ``"safetensors"``.
        certify: record each case's precision certificate (:func:`reflex.certify.case_record`: float64
            error against mpmath for tiny cases where reflex has the formula, else longdouble) as the
            case entry's ``certificate``.
        progress: show a tqdm bar on stderr.

    Cases are ordered by mechanism key, size, shape, then the case builder's order. Files of the
    same name are overwritten; nothing else in ``out_dir`` is touched. Returns the manifest (also
    written as ``out_dir/manifest.json``, its digest as ``out_dir/manifest.json.sha256``).

    Raises ``KeyError`` for an unknown mechanism (with close matches), ``ValueError`` for an
    unknown size, format, dtype or shape option, and :class:`FixtureError` when a case cannot be
    written or every case was skipped.
    """
    from tqdm import tqdm

    chosen = _select(mechanisms)
    sizes = _sizes(sizes)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    shapes = _shapes(shapes)
    dtypes = _dtypes(dtypes)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    plan = _plan(chosen, sizes, seed, _grid(shapes))

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    entries, skipped = [], list(plan.skipped)
    bar = tqdm(plan.cases, desc="fixtures", unit="case", file=sys.stderr, disable=not progress, leave=True)
    for cid, size, shape, mechanism, case in bar:
        bar.set_postfix_str(cid, refresh=False)
        built = _build(cid, size, shape, mechanism, case, dtypes, format)
        if isinstance(built, str):
            skipped.append(_skip(mechanism.key, size, shape, case.variant, built))
            continue
        entry, members = built
        if certify:
            from reflex.certify import case_record, default_method

            entry["certificate"] = case_record(mechanism, case, method=default_method(size))
        data = _file_bytes(members, format)
        npz.write_atomic(folder / entry["file"], data)
        entries.append({**entry, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    if not entries:
        reasons = "; ".join(f"{s['mechanism']} {_shape_tag(s['shape'])}: {s['reason']}" for s in skipped[:3])
        raise FixtureError(f"every case was skipped at the requested shapes, nothing written ({reasons})")
    order = {key: i for i, key in enumerate(_skip_order(chosen, sizes, _grid(shapes)))}
    skipped.sort(key=lambda s: order[(s["mechanism"], s["size"], _shape_tag(s["shape"]))])  # stable
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "reflex_version": reflex.__version__,
        "numpy_version": numpy.__version__,
        "seed": seed,
        "sizes": sizes,
        "mechanisms": [m.key for m in chosen],
        "format": format,
        "dtypes": dtypes,
        "shapes": shapes,
        "skipped": skipped,
        "cases": entries,
    }
    npz.write_atomic(folder / MANIFEST, canonical_bytes(manifest))
    npz.write_atomic(folder / DIGEST_FILE, f"{digest(manifest)}  {MANIFEST}\n".encode("ascii"))
    return manifest


def _skip_order(chosen: Sequence[registry.Mechanism], sizes: Sequence[str], grid: Sequence[dict[str, int]]
                ) -> list[tuple[str, str, str]]:
    return [(m.key, size, _shape_tag(shape)) for m in chosen for size in sizes for shape in grid]


# ----------------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class CaseVerification:
    """One recomputed case: ``max_abs`` over its outputs and gradients, ``identical`` when bitwise equal."""

    id: str
    max_abs: float
    identical: bool
    ok: bool
    message: str = ""


class VerifyReport(list):
    """The :class:`CaseVerification` of every case (a list), with the set ``digest`` and the ``unlisted``
    entries of the folder (names the manifest does not list: reported, not a failure)."""

    def __init__(self, results: Iterable[CaseVerification], *, digest: str, unlisted: Sequence[str]):
        super().__init__(results)
        self.digest = digest
        self.unlisted = list(unlisted)


# Case entry fields that verify recomputes (bytes and sha256 are checked against the files at load).
_RECOMPUTED = ("mechanism", "variant", "size", "shape", "seed", "params", "positional", "file", "arrays",
               "tolerances", "paper")


def _json_text(value: Any) -> str:
    """Canonical JSON: tells ``1`` from ``1.0`` and ``true`` from ``1``, which ``==`` does not."""
    return json.dumps(value, sort_keys=True, allow_nan=False)


def _short(value: Any) -> str:
    text = _json_text(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _differences(stored: Any, fresh: Any, path: str) -> list[str]:
    """Where two JSON values differ, as ``manifest field <path> is …; this reflex computes …`` lines."""
    if isinstance(stored, dict) and isinstance(fresh, dict) and set(stored) == set(fresh):
        return [line for key in sorted(stored) for line in _differences(stored[key], fresh[key], f"{path}.{key}")]
    if isinstance(stored, list) and isinstance(fresh, list) and len(stored) == len(fresh) and path.endswith("shape"):
        return [line for i, (a, b) in enumerate(zip(stored, fresh)) for line in _differences(a, b, f"{path}[{i}]")]
    if _json_text(stored) == _json_text(fresh):
        return []
    return [f"manifest field {path} is {_short(stored)}; this reflex computes {_short(fresh)}"]


def _compare_case(stored: FixtureCase, entry: Mapping[str, Any], members: Sequence[tuple[str, numpy.ndarray]]
                  ) -> CaseVerification:
    problems = [line for name in _RECOMPUTED for line in _differences(stored.entry[name], entry[name], name)]
    fresh = dict(members)
    stored_arrays = {**{f"input.{n}": a for n, a in stored.inputs.items()}, **stored.outputs,
                     **{f"d_{n}": a for n, a in stored.cotangents.items()},
                     **{f"grad.{n}": a for n, a in stored.grads.items()}}
    tol = TOLERANCES["float64"]
    worst, identical = 0.0, True
    for name in sorted(set(fresh) | set(stored_arrays)):
        again, kept = fresh.get(name), stored_arrays.get(name)
        if again is None or kept is None:
            problems.append(f"{name} is stored but not computed by this reflex" if again is None
                            else f"{name} is computed by this reflex but not stored")
            continue
        if again.shape != kept.shape or again.dtype != kept.dtype:
            problems.append(f"{name} is {kept.dtype} {kept.shape}; this reflex computes {again.dtype} {again.shape}")
            continue
        same = bool(numpy.array_equal(again, kept, equal_nan=True))
        if name.startswith(("input.", "d_")):
            if not same:
                what = f"input {name[6:]}" if name.startswith("input.") else f"cotangent {name}"
                problems.append(f"{what} differs from the case builder's (stale fixtures?)")
            continue
        identical &= same
        error, bad = _outside(again, kept, tol.atol, tol.rtol)
        largest = float(numpy.max(error)) if error.size else 0.0
        worst = max(worst, largest)
        if numpy.any(bad):
            problems.append(f"{name} differs by up to {largest:.3e} (float64 tolerance {tol.atol:.0e})")
    return CaseVerification(stored.id, worst, identical and not problems, not problems, "; ".join(problems))


def _unlisted(folder: Path, manifest: Mapping[str, Any]) -> list[str]:
    listed = {MANIFEST, DIGEST_FILE} | {entry["file"] for entry in manifest["cases"]}
    return sorted(p.name for p in folder.iterdir() if p.name not in listed)


def _normalised(manifest: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(problems with the generation arguments as recorded, registered mechanisms' keys)."""
    problems, keys = [], []
    for key in manifest["mechanisms"]:
        try:
            keys.append(registry.get(key).key)
        except KeyError as err:
            problems.append(f"mechanism {key}: {err.args[0]} in this reflex")
    checks = {"mechanisms": lambda v: sorted(set(v)), "sizes": _sizes, "shapes": _shapes, "dtypes": _dtypes}
    for name, normalise in checks.items():
        try:
            again = normalise(manifest[name])
        except (ValueError, TypeError) as err:
            problems.append(f"manifest field {name}: {err}")
            continue
        if _json_text(again) != _json_text(manifest[name]):
            problems.append(f"manifest field {name} is {_short(manifest[name])}; generate writes {_short(again)}")
    return problems, keys


def verify(path: str | os.PathLike[str], *, progress: bool = False, digest: str | None = None) -> VerifyReport:
    """Check the set against its manifest and rebuild the manifest and every case with this reflex.

    Loading checks the schema, the pinned ``digest`` (if given), file names, sizes and hashes.
    Then the set is regenerated from the manifest's recorded arguments (mechanisms, sizes, seed,
    shapes, dtypes, format): every recomputable manifest field — each case's params, positional,
    tolerances, shape, array dtypes and shapes, id, file, paper, the list and order of cases and
    of skipped cases — must equal what reflex computes, inputs and cotangents must be identical,
    and outputs and gradients must agree within the float64 tolerance. Any difference is reported
    as tampering (or a set written by another reflex version).

    Returns a :class:`VerifyReport` (one :class:`CaseVerification` per case, the set digest, and
    the folder's entries that the manifest does not list). Raises :class:`FixtureError` listing
    every failing case and set-level difference.
    """
    from tqdm import tqdm

    fixture_set = load(path, digest=digest)
    manifest, folder = fixture_set.manifest, fixture_set.path
    problems, keys = _normalised(manifest)
    set_digest = fixture_set.digest
    digest_file = folder / DIGEST_FILE
    if digest_file.is_file() and digest_file.read_bytes() != f"{set_digest}  {MANIFEST}\n".encode("ascii"):
        problems.append(f"{DIGEST_FILE} does not record the manifest's digest {set_digest}")
    stored = {case.id: case for case in fixture_set}
    chosen = [registry.get(key) for key in sorted(set(keys))]
    try:
        sizes, shapes, dtypes = _sizes(manifest["sizes"]), _shapes(manifest["shapes"]), _dtypes(manifest["dtypes"])
    except (ValueError, TypeError):
        sizes, shapes, dtypes = manifest["sizes"], {}, list(TOLERANCES)  # reported by _normalised
    plan = _plan(chosen, sizes, manifest["seed"], _grid(shapes))
    fresh_ids, results, skipped = [], {}, list(plan.skipped)
    for cid, size, shape, mechanism, case in tqdm(plan.cases, desc="verify", unit="case", file=sys.stderr,
                                                  disable=not progress):
        if cid not in stored and not shape:
            fresh_ids.append(cid)
            continue
        built = _build(cid, size, shape, mechanism, case, dtypes, manifest["format"])
        if isinstance(built, str):
            skipped.append(_skip(mechanism.key, size, shape, case.variant, built))
            continue
        fresh_ids.append(cid)
        if cid in stored:
            results[cid] = _compare_case(stored[cid], *built)
    for cid in stored:
        if cid not in results:
            results[cid] = CaseVerification(cid, float("inf"), False, False,
                                            "listed in the manifest, but its recorded arguments generate no such case "
                                            "(added, renamed, or its mechanism is not registered)")
    dropped = [cid for cid in fresh_ids if cid not in stored]
    if dropped:
        problems.append(f"{len(dropped)} case(s) that the recorded arguments generate are missing from the manifest: "
                        + ", ".join(dropped[:10]) + (", ..." if len(dropped) > 10 else ""))
    elif [cid for cid in stored if cid in set(fresh_ids)] != [cid for cid in fresh_ids if cid in stored]:
        problems.append("the cases are not in the order generate writes them")
    order = {k: i for i, k in enumerate(_skip_order(chosen, sizes, _grid(shapes)))}
    skipped.sort(key=lambda s: order[(s["mechanism"], s["size"], _shape_tag(s["shape"]))])
    recorded = [(s["mechanism"], s["size"], _shape_tag(s["shape"]), s["variant"]) for s in manifest["skipped"]]
    if recorded != [(s["mechanism"], s["size"], _shape_tag(s["shape"]), s["variant"]) for s in skipped]:
        problems.append("manifest field skipped does not list the cases that this reflex skips at the recorded shapes")
    report = VerifyReport([results[case.id] for case in fixture_set], digest=set_digest,
                          unlisted=_unlisted(folder, manifest))
    failed = [r for r in report if not r.ok]
    if failed or problems:
        parts = [f"case {r.id}: {r.message}" for r in failed] + [f"set: {p}" for p in problems]
        head = (f"{len(failed)} of {len(report)} cases fail verification" if failed
                else "the set fails verification")
        raise FixtureError(f"{head}: " + "; ".join(parts))
    return report
