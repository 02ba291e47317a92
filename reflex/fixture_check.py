"""Compare outputs and gradients another implementation exported with a fixture set: :func:`check`.

Import from :mod:`reflex.fixtures`, which re-exports these names. The exported file is an ``.npz``
or a ``.safetensors`` (read without unpickling, as fixture files are) or a mapping, with one array
per case id (``<id>``), and optionally ``<id>.lse`` and ``<id>.grad.<name>``. Each array passes
when every element satisfies ``|actual − expected| ≤ atol + rtol·|expected|`` at the tolerance the
manifest records for its dtype; the report gives the worst ratio ``|err| / (atol + rtol·|ref|)``
per array (≤ 1 passes), so a PASS row never looks like a failure. Format: ``docs/fixtures.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


from reflex.backends import to_numpy
from reflex.fixture_set import FixtureCase, FixtureError, _read_members, _read_tensors, load
from reflex.testing import TOLERANCES, Tolerance, _outside, _worst, dtype_name
from reflex.backends import numpy_namespace

hnp = numpy_namespace()  # host NumPy (files, long double), through the backends layer

__all__ = ["check", "CheckResult", "CheckReport", "RULE"]

RULE = "|err| ≤ atol + rtol·|ref| per element; err/bound = max |err| / (atol + rtol·|ref|), PASS when ≤ 1"


@dataclass(frozen=True)
class CheckResult:
    """One exported array against its fixture: status ``pass``, ``fail`` or ``missing``.

    ``array`` is ``output``, ``lse`` or ``grad.<name>``; ``margin`` the worst ``|err| / (atol +
    rtol·|ref|)`` (≤ 1 passes; ``inf`` for a NaN or a mismatched infinity).
    """

    id: str
    array: str
    status: str
    dtype: str = ""
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    atol: float = float("nan")
    rtol: float = float("nan")
    worst: tuple[int, ...] = ()
    message: str = ""
    margin: float = float("nan")


@dataclass(frozen=True)
class CheckReport:
    """Per-case results of :func:`check`; ``passed`` when nothing failed and something was checked."""

    results: list[CheckResult]
    require_all: bool = False

    @property
    def failed(self) -> list[CheckResult]:
        """Failed comparisons, and with ``require_all`` the cases not exported."""
        return [r for r in self.results if r.status == "fail" or (self.require_all and r.status == "missing")]

    @property
    def checked(self) -> list[CheckResult]:
        return [r for r in self.results if r.status != "missing"]

    @property
    def passed(self) -> bool:
        return bool(self.checked) and not self.failed

    def summary(self) -> str:
        """``N passed, M failed, K not exported`` (M counts unexported cases under ``require_all``)."""
        passed = sum(r.status == "pass" for r in self.results)
        missing = sum(r.status == "missing" for r in self.results)
        text = f"{passed} passed, {len(self.failed)} failed, {missing} not exported"
        if self.require_all and missing:
            text += f" (the {missing} not exported count as failed: --require-all)"
        if not self.checked:
            text += "; nothing was checked: no exported array is named by a case id"
        return text

    def table(self, *, quiet: bool = False) -> str:
        """The rule, one row per case and array, the failures' details, then the summary line.

        ``quiet``: only the failures' details and the summary.
        """
        head = ("case", "array", "dtype", "max abs", "err/bound", "atol", "rtol", "status")
        rows = [head]
        for r in self.results:
            if r.status == "missing":
                rows.append((r.id, r.array, "-", "-", "-", "-", "-",
                             "NOT EXPORTED (FAIL)" if self.require_all else "not exported"))
                continue
            numbers = [f"{x:.2e}" if x == x else "-" for x in (r.max_abs, r.margin, r.atol, r.rtol)]
            rows.append((r.id, r.array, r.dtype or "-", *numbers, r.status.upper()))
        lines = []
        if not quiet:
            widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
            lines.append(f"rule: {RULE}")
            lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
        lines += [f"FAIL {r.id} {r.array}: {r.message}" for r in self.results if r.status == "fail"]
        if self.require_all:
            lines += [f"FAIL {r.id} {r.array}: not exported (--require-all)" for r in self.results
                      if r.status == "missing"]
        lines.append(self.summary())
        return "\n".join(lines)


def _compare(cid: str, what: str, actual: hnp.ndarray, expected: hnp.ndarray, case: FixtureCase,
             dtype: str | None) -> CheckResult:
    name = dtype or actual.dtype.name
    if name not in TOLERANCES:
        return CheckResult(cid, what, "fail", name, message=f"dtype {name} is not a tested floating dtype "
                                                             f"({', '.join(TOLERANCES)}); pass --dtype")
    try:
        tol: Tolerance = case.tolerance(name)
    except ValueError as err:
        return CheckResult(cid, what, "fail", name, message=str(err))
    if actual.shape != expected.shape:
        return CheckResult(cid, what, "fail", name, atol=tol.atol, rtol=tol.rtol,
                           message=f"shape {actual.shape}, expected {expected.shape}")
    a, e = actual.astype(hnp.float64), expected.astype(hnp.float64)
    if a.size == 0:
        return CheckResult(cid, what, "pass", name, 0.0, 0.0, tol.atol, tol.rtol, margin=0.0)
    error, bad = _outside(a, e, tol.atol, tol.rtol)
    with hnp.errstate(invalid="ignore", divide="ignore", over="ignore"):
        relative = hnp.where(error == 0, 0.0, error / hnp.abs(e))
        ratio = hnp.where(error == 0, 0.0, error / (tol.atol + tol.rtol * hnp.abs(e)))
    ratio = hnp.where(bad & ~(ratio > 1), hnp.inf, ratio)  # NaN or a mismatched infinity: worst of all
    worst = _worst(error, bad, e, tol.atol, tol.rtol) if hnp.any(bad) else ()
    message = ""
    if hnp.any(bad):
        message = (f"{int(hnp.sum(bad))} of {a.size} elements outside atol {tol.atol:.0e} + rtol {tol.rtol:.0e}·|expected|; "
                   f"worst at {worst}: got {float(a[worst]):.9g}, expected {float(e[worst]):.9g}")
    return CheckResult(cid, what, "fail" if hnp.any(bad) else "pass", name, float(hnp.max(error)),
                       float(hnp.max(relative)), tol.atol, tol.rtol, worst, message, float(hnp.max(ratio)))


def _read_exported(exported: str | os.PathLike[str] | Mapping[str, Any]
                   ) -> tuple[dict[str, hnp.ndarray], dict[str, str]]:
    """(arrays by name, source dtype names by name) from a mapping, an ``.npz`` or a ``.safetensors``."""
    if isinstance(exported, Mapping):
        arrays = {name: hnp.asarray(to_numpy(a) if not isinstance(a, hnp.ndarray) else a)
                  for name, a in exported.items()}
        return arrays, {}
    source = Path(exported)
    if source.suffix not in (".npz", ".safetensors"):
        raise FixtureError(f"{source}: exported outputs must be an .npz or a .safetensors file")
    try:
        data = source.read_bytes()
    except OSError as err:
        raise FixtureError(f"{source}: cannot read the exported file: {err}") from None
    if source.suffix == ".npz":
        return _read_members(data, f"exported file {source}", expected=None, stored_only=False), {}
    arrays, dtypes = _read_tensors(data, f"exported file {source}", expected=None)
    return arrays, {name: d for name, d in dtypes.items() if d != arrays[name].dtype.name}


def check(path: str | os.PathLike[str], exported: str | os.PathLike[str] | Mapping[str, Any], *,
          dtype: Any = None, require_all: bool = False, digest: str | None = None) -> CheckReport:
    """Compare outputs (and gradients) another implementation computed on the fixture inputs with the fixtures.

    ``exported`` is an ``.npz``, a ``.safetensors`` (``BF16`` tensors are compared at the
    bfloat16 tolerance) or a mapping, with one array per case named by case id, and optionally
    ``<id>.lse`` and ``<id>.grad.<name>`` (the gradient of input ``name`` for the case's
    ``d_out``/``d_lse``). Each is compared at the tolerance recorded for its dtype (or for
    ``dtype``, e.g. ``"bfloat16"`` when bfloat16 results were saved as float32). Cases without an
    exported output are reported as not exported (a failure with ``require_all``). An exported
    name that matches no case array raises :class:`FixtureError`, as does an unreadable file or a
    set whose digest differs from ``digest``.
    """
    fixture_set = load(path, digest=digest)
    dtype = None if dtype is None else dtype_name(dtype)
    if dtype is not None and dtype not in TOLERANCES:
        raise ValueError(f"dtype must be one of {', '.join(TOLERANCES)}; got {dtype!r}")
    arrays, source_dtypes = _read_exported(exported)
    known = {case.id: case for case in fixture_set}
    names = {name for case in fixture_set
             for name in (case.id, f"{case.id}.lse", *(f"{case.id}.grad.{g}" for g in case.grads))}
    unknown = sorted(set(arrays) - names)
    if unknown:
        import difflib

        hints = []
        for name in unknown[:5]:
            close = difflib.get_close_matches(name, names, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise FixtureError(f"exported arrays name no case of {fixture_set.path}: {', '.join(hints)}")
    results = []
    for cid, case in known.items():
        if cid not in arrays:
            results.append(CheckResult(cid, "output", "missing"))
        targets = [("output", cid, case.output), ("lse", f"{cid}.lse", case.lse)]
        targets += [(f"grad.{g}", f"{cid}.grad.{g}", case.grads[g]) for g in sorted(case.grads)]
        for what, name, expected in targets:
            if name not in arrays:
                continue
            if expected is None:
                results.append(CheckResult(cid, what, "fail", message="this case has no lse"))
                continue
            results.append(_compare(cid, what, arrays[name], expected, case, dtype or source_dtypes.get(name)))
    return CheckReport(results, require_all)
