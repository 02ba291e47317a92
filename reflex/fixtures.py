"""Golden fixtures: write, load, verify and check sets of reference cases (format: ``docs/fixtures.md``).

A *fixture set* is a folder holding one ``<case id>.npz`` per case and a ``manifest.json``. Cases
come from the registry's case builders (``Mechanism.cases(size, seed)``), so every registered
mechanism flows through without code here. Case id: ``<key>-<variant>-<n>`` with ``n`` the index
of the size in :data:`reflex.registry.SIZES` (tiny 0, small 1, medium 2, large 3).

Each ``.npz`` is an uncompressed zip of ``.npy`` members: ``input.<name>`` for every input (every
random array included), ``output`` (the mechanism's output, or the first element of a returned
tuple), ``output.<i>`` for further tuple elements, and ``lse`` for mechanisms that return it.

Guarantees:

- *Deterministic*: the same mechanisms, sizes and seed give byte-identical files (zip entries with a
  fixed date, fixed attributes and no compression; the manifest is JSON with sorted keys).
- *Safe to load*: nothing is unpickled (object dtypes are refused before NumPy sees them), file
  names cannot leave the folder, every file's sha256 is checked before it is parsed, and any
  malformed input raises :class:`FixtureError` naming the case.

This module writes (:func:`generate`), recomputes (:func:`verify`) and compares (:func:`check`);
reading lives in :mod:`reflex.fixture_set` and the ``.npz`` bytes in :mod:`reflex.backends.npz`.
Import everything from here: the public names of both are re-exported.
"""

from __future__ import annotations

import hashlib
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
from reflex.backends import npz, to_numpy
from reflex.fixture_set import MANIFEST, SCHEMA_VERSION, FixtureCase, FixtureError, FixtureSet, _read_members, load
from reflex.testing import TOLERANCES, Tolerance, _outside, _worst, dtype_name

__all__ = [
    "SCHEMA_VERSION", "MANIFEST", "DEFAULT_SIZES", "FixtureError", "FixtureCase", "FixtureSet",
    "generate", "load", "verify", "check", "case_id", "CaseVerification", "CheckResult", "CheckReport",
]


DEFAULT_SIZES = ("tiny", "small")


def case_id(key: str, variant: str, size: str) -> str:
    """``<key>-<variant>-<n>``, n the index of ``size`` in ``SIZES``; characters outside [A-Za-z0-9_] → ``_``."""
    return f"{key}-{re.sub(r'[^A-Za-z0-9_]', '_', variant)}-{registry.SIZES.index(size)}"


# ----------------------------------------------------------------------------------------------- writing


def _json_default(value: Any) -> Any:
    if isinstance(value, numpy.bool_):
        return bool(value)
    if isinstance(value, numpy.integer):
        return int(value)
    if isinstance(value, numpy.floating):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def _jsonable(value: Any, what: str) -> Any:
    """``value`` as it reads back from JSON (tuples → lists); non-JSON values raise FixtureError."""
    try:
        return json.loads(json.dumps(value, default=_json_default, allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise FixtureError(f"{what} must be JSON-able (finite numbers, strings, lists, dicts): {err}") from None


def _canonical(array: Any, what: str) -> numpy.ndarray:
    """:func:`reflex.backends.npz.canonical`, its refusal raised as :class:`FixtureError`."""
    try:
        return npz.canonical(array, what)
    except npz.NpzError as err:
        raise FixtureError(str(err)) from None


_npz_bytes = npz.npz_bytes  # kept under its old name: tests build consistent but wrong case files with it


def _case_inputs(case: registry.Case, cid: str) -> list[tuple[str, numpy.ndarray]]:
    """The input members of one case file, sorted by name."""
    members = []
    for name in sorted(case.inputs):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise FixtureError(f"case {cid}: input name {name!r} is not an identifier")
        members.append((f"input.{name}", _canonical(case.inputs[name], f"case {cid}: input {name}")))
    return members


def _case_outputs(mechanism: registry.Mechanism, case: registry.Case, cid: str) -> list[tuple[str, numpy.ndarray]]:
    """The output members of one case file: output, further outputs ``output.<i>``, lse."""
    members = []
    try:
        result = case.call(mechanism, **({"return_lse": True} if mechanism.returns_lse else {}))
    except Exception as err:
        raise FixtureError(f"case {cid}: {mechanism.key} failed on its own case: {type(err).__name__}: {err}") from err
    parts = list(result) if isinstance(result, tuple) else [result]
    output = _canonical(parts[0], f"case {cid}: output")
    members.append(("output", output))
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
    return members


def _select(mechanisms: Iterable[str] | None) -> list[registry.Mechanism]:
    if mechanisms is None:
        return sorted(registry.list_mechanisms(), key=lambda m: m.key)
    if isinstance(mechanisms, str):
        mechanisms = [mechanisms]
    keys = sorted(dict.fromkeys(mechanisms))
    if not keys:
        raise ValueError("mechanisms is empty; pass None for every registered mechanism")
    return [registry.get(key) for key in keys]  # an unknown key raises KeyError with close matches


def generate(out_dir: str | os.PathLike[str], mechanisms: Iterable[str] | None = None,
             sizes: Sequence[str] = DEFAULT_SIZES, seed: int = 0, *, progress: bool = False) -> dict[str, Any]:
    """Write a fixture set for ``mechanisms`` (default: every registered one) at ``sizes`` into ``out_dir``.

    Cases are ordered by mechanism key, then size, then the case builder's order. Files of the
    same name are overwritten; nothing else in ``out_dir`` is touched. ``progress`` shows a tqdm bar
    on stderr. Returns the manifest (also written as ``out_dir/manifest.json``).

    Raises ``KeyError`` for an unknown mechanism (with close matches), ``ValueError`` for an
    unknown size, and :class:`FixtureError` when a case cannot be written.
    """
    from tqdm import tqdm

    chosen = _select(mechanisms)
    sizes = list(dict.fromkeys([sizes] if isinstance(sizes, str) else sizes))
    if not sizes:
        raise ValueError("sizes is empty")
    sizes.sort(key=lambda s: (registry.size_scale(s), s))  # validates each size
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")

    planned: list[tuple[str, str, registry.Mechanism, registry.Case]] = []
    for mechanism in chosen:
        for size in sizes:
            try:
                cases = mechanism.cases(size, seed)
            except Exception as err:
                raise FixtureError(f"{mechanism.key}: its case builder failed at size {size}, seed {seed}: "
                                   f"{type(err).__name__}: {err}") from err
            for case in cases:
                planned.append((case_id(mechanism.key, case.variant, size), size, mechanism, case))
    seen: dict[str, str] = {}
    for cid, _, _, case in planned:
        if cid in seen:
            raise FixtureError(f"case {cid}: two cases map to this id (variants {seen[cid]!r} and {case.variant!r})")
        seen[cid] = case.variant

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    bar = tqdm(planned, desc="fixtures", unit="case", file=sys.stderr, disable=not progress, leave=True)
    for cid, size, mechanism, case in bar:
        bar.set_postfix_str(cid, refresh=False)
        members = _case_inputs(case, cid) + _case_outputs(mechanism, case, cid)
        data = npz.npz_bytes(members)
        npz.write_atomic(folder / f"{cid}.npz", data)
        entries.append({
            "id": cid,
            "mechanism": mechanism.key,
            "variant": case.variant,
            "size": size,
            "seed": case.seed,
            "params": _jsonable(dict(case.params), f"case {cid}: params"),
            "positional": list(case.positional),
            "file": f"{cid}.npz",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "arrays": {name: {"dtype": a.dtype.name, "shape": list(a.shape)} for name, a in members},
            "tolerances": {name: {"atol": t.atol, "rtol": t.rtol} for name, t in TOLERANCES.items()},
            "paper": mechanism.paper,
        })
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "reflex_version": reflex.__version__,
        "numpy_version": numpy.__version__,
        "seed": seed,
        "sizes": sizes,
        "mechanisms": [m.key for m in chosen],
        "cases": entries,
    }
    npz.write_atomic(folder / MANIFEST, _manifest_bytes(manifest))
    return manifest


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class CaseVerification:
    """One recomputed case: ``max_abs`` over its outputs, ``identical`` when bitwise equal."""

    id: str
    max_abs: float
    identical: bool
    ok: bool
    message: str = ""


def _errors(actual: numpy.ndarray, expected: numpy.ndarray, tol: Tolerance) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(|actual − expected|, outside tolerance) in float64, by :mod:`reflex.testing`'s rule."""
    return _outside(actual, expected, tol.atol, tol.rtol)


def _verify_case(case: FixtureCase) -> CaseVerification:
    try:
        mechanism = registry.get(case.mechanism)
    except KeyError as err:
        return CaseVerification(case.id, float("inf"), False, False, f"mechanism not registered: {err.args[0]}")
    if case.size not in registry.SIZES:
        return CaseVerification(case.id, float("inf"), False, False, f"unknown size {case.size!r}")
    rebuilt = {c.variant: c for c in mechanism.cases(case.size, case.seed)}.get(case.variant)
    if rebuilt is None:
        return CaseVerification(case.id, float("inf"), False, False,
                                f"{case.mechanism}'s case builder has no variant {case.variant!r} at size {case.size}")
    if sorted(rebuilt.inputs) != sorted(case.inputs) or _jsonable(dict(rebuilt.params), case.id) != case.params:
        return CaseVerification(case.id, float("inf"), False, False,
                                "inputs or params differ from the case builder's (stale fixtures?)")
    for name, stored in case.inputs.items():
        if not numpy.array_equal(numpy.asarray(rebuilt.inputs[name]), stored, equal_nan=True):
            return CaseVerification(case.id, float("inf"), False, False,
                                    f"input {name} differs from the case builder's (stale fixtures?)")
    fresh = dict(_case_outputs(mechanism, rebuilt, case.id))
    tol = TOLERANCES["float64"]
    worst, identical, problems = 0.0, True, []
    for name, stored in case.outputs.items():
        again = fresh.get(name)
        if again is None or again.shape != stored.shape:
            problems.append(f"{name} has shape {None if again is None else again.shape}; stored {stored.shape}")
            continue
        identical &= bool(numpy.array_equal(again, stored, equal_nan=True))
        error, bad = _errors(again, stored, tol)
        largest = float(numpy.max(error)) if error.size else 0.0
        worst = max(worst, largest)
        if numpy.any(bad):
            problems.append(f"{name} differs by up to {largest:.3e} (float64 tolerance {tol.atol:.0e})")
    extra = sorted(set(fresh) - set(case.outputs))
    if extra:
        problems.append(f"the mechanism now also returns {', '.join(extra)}")
    return CaseVerification(case.id, worst, identical and not problems, not problems, "; ".join(problems))


def verify(path: str | os.PathLike[str], *, progress: bool = False) -> list[CaseVerification]:
    """Check every file's hash and recompute every case with this reflex; raise on any difference.

    Integrity problems (hash, file names, corruption, schema) raise :class:`FixtureError` at load;
    a case whose inputs no longer match its case builder, or whose recomputed outputs differ beyond
    the float64 tolerance, raises :class:`FixtureError` listing every failing case. Returns one
    :class:`CaseVerification` per case when all pass.
    """
    from tqdm import tqdm

    fixture_set = load(path)
    results = [_verify_case(case) for case in tqdm(fixture_set, desc="verify", unit="case", file=sys.stderr,
                                                   disable=not progress)]
    failed = [r for r in results if not r.ok]
    if failed:
        raise FixtureError(f"{len(failed)} of {len(results)} cases fail verification: "
                           + "; ".join(f"case {r.id}: {r.message}" for r in failed))
    return results


# ----------------------------------------------------------------------------------------------- check


@dataclass(frozen=True)
class CheckResult:
    """One exported array against its fixture: status ``pass``, ``fail`` or ``missing``."""

    id: str
    array: str                 # "output" or "lse"
    status: str
    dtype: str = ""
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    atol: float = float("nan")
    rtol: float = float("nan")
    worst: tuple[int, ...] = ()
    message: str = ""


@dataclass(frozen=True)
class CheckReport:
    """Per-case results of :func:`check`; ``passed`` when nothing failed and something was checked."""

    results: list[CheckResult]
    require_all: bool = False

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "fail" or (self.require_all and r.status == "missing")]

    @property
    def checked(self) -> list[CheckResult]:
        return [r for r in self.results if r.status != "missing"]

    @property
    def passed(self) -> bool:
        return bool(self.checked) and not self.failed

    def table(self) -> str:
        """The report as a text table, one row per case and array, then a summary line."""
        head = ("case", "array", "dtype", "max abs", "max rel", "atol", "rtol", "status")
        rows = [head]
        for r in self.results:
            if r.status == "missing":
                rows.append((r.id, r.array, "-", "-", "-", "-", "-", "not exported"))
                continue
            numbers = [f"{x:.2e}" if x == x else "-" for x in (r.max_abs, r.max_rel, r.atol, r.rtol)]
            rows.append((r.id, r.array, r.dtype or "-", *numbers, r.status.upper()))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
        lines += [f"FAIL {r.id} {r.array}: {r.message}" for r in self.results if r.status == "fail"]
        passed = sum(r.status == "pass" for r in self.results)
        failed = sum(r.status == "fail" for r in self.results)
        missing = sum(r.status == "missing" for r in self.results)
        summary = f"{passed} passed, {failed} failed, {missing} not exported"
        if not self.checked:
            summary += "; nothing was checked: no exported array is named by a case id"
        lines.append(summary)
        return "\n".join(lines)


def _compare(cid: str, what: str, actual: numpy.ndarray, expected: numpy.ndarray, case: FixtureCase,
             dtype: str | None) -> CheckResult:
    name = dtype or actual.dtype.name
    if name not in TOLERANCES:
        return CheckResult(cid, what, "fail", name, message=f"dtype {name} is not a tested floating dtype "
                                                             f"({', '.join(TOLERANCES)}); pass --dtype")
    tol = case.tolerance(name)
    if actual.shape != expected.shape:
        return CheckResult(cid, what, "fail", name, atol=tol.atol, rtol=tol.rtol,
                           message=f"shape {actual.shape}, expected {expected.shape}")
    a, e = actual.astype(numpy.float64), expected.astype(numpy.float64)
    error, bad = _errors(a, e, tol)
    with numpy.errstate(invalid="ignore", divide="ignore"):
        relative = numpy.where(error == 0, 0.0, error / numpy.abs(e))
    if error.size == 0:
        return CheckResult(cid, what, "pass", name, 0.0, 0.0, tol.atol, tol.rtol)
    worst = _worst(error, bad, e, tol.atol, tol.rtol) if numpy.any(bad) else ()
    message = ""
    if numpy.any(bad):
        message = (f"{int(numpy.sum(bad))} of {a.size} elements outside atol {tol.atol:.0e} + rtol {tol.rtol:.0e}·|expected|; "
                   f"worst at {worst}: got {float(a[worst]):.9g}, expected {float(e[worst]):.9g}")
    return CheckResult(cid, what, "fail" if numpy.any(bad) else "pass", name, float(numpy.max(error)),
                       float(numpy.max(relative)), tol.atol, tol.rtol, worst, message)


def check(path: str | os.PathLike[str], exported: str | os.PathLike[str] | Mapping[str, Any], *,
          dtype: Any = None, require_all: bool = False) -> CheckReport:
    """Compare outputs another implementation computed on the fixture inputs with the fixtures.

    ``exported`` is an ``.npz`` (or a mapping) with one array per case named by case id, and
    optionally ``<id>.lse``. Each is compared at the tolerance recorded for its dtype (or for
    ``dtype``, e.g. ``"bfloat16"`` when bfloat16 results were saved as float32). Cases without an
    exported array are reported as not exported (a failure with ``require_all``). An exported
    name that matches no case raises :class:`FixtureError`, as does an unreadable file.
    """
    fixture_set = load(path)
    dtype = None if dtype is None else dtype_name(dtype)
    if dtype is not None and dtype not in TOLERANCES:
        raise ValueError(f"dtype must be one of {', '.join(TOLERANCES)}; got {dtype!r}")
    if isinstance(exported, Mapping):
        arrays = {name: numpy.asarray(to_numpy(a) if not isinstance(a, numpy.ndarray) else a)
                  for name, a in exported.items()}
    else:
        source = Path(exported)
        try:
            data = source.read_bytes()
        except OSError as err:
            raise FixtureError(f"{source}: cannot read the exported file: {err}") from None
        arrays = _read_members(data, f"exported file {source}", expected=None, stored_only=False)
    known = {name for case in fixture_set for name in (case.id, f"{case.id}.lse")}
    unknown = sorted(set(arrays) - known)
    if unknown:
        import difflib

        hints = []
        for name in unknown[:5]:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise FixtureError(f"exported arrays name no case of {fixture_set.path}: {', '.join(hints)}")
    results = []
    for case in fixture_set:
        if case.id not in arrays:
            results.append(CheckResult(case.id, "output", "missing"))
            continue
        results.append(_compare(case.id, "output", arrays[case.id], case.output, case, dtype))
        if f"{case.id}.lse" in arrays:
            if case.lse is None:
                results.append(CheckResult(case.id, "lse", "fail", message="this case has no lse"))
            else:
                results.append(_compare(case.id, "lse", arrays[f"{case.id}.lse"], case.lse, case, dtype))
    return CheckReport(results, require_all)
