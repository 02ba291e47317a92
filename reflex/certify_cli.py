"""``reflex certify KEY... [--sizes] [--method] [--dps] [--seed]``: certify registry cases in bulk.

:func:`certify_registry` runs :func:`reflex.certify.certify` on every case of the chosen mechanisms
and sizes (tiny cases with mpmath where reflex has the formula, larger ones with longdouble: see
:func:`reflex.certify.default_method`), with a tqdm bar on a terminal; :func:`format_results`
prints them as a table; :func:`add_parser` adds the command to ``reflex`` (``reflex/cli.py``).
``scripts/certify_table.py`` builds ``docs/precision.md`` from the same sweep.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

from reflex import registry
from reflex.certify import METHODS, Certificate, CertificationError, certify_case, default_method

__all__ = ["CaseCertificate", "certify_registry", "format_results", "add_parser"]


@dataclass(frozen=True)
class CaseCertificate:
    """One registry case's certificate (``certificate``) or why it has none (``error``), and the time taken."""

    key: str
    size: str
    variant: str
    certificate: Certificate | None
    error: str | None
    seconds: float


def certify_registry(keys: Any = None, sizes: Any = ("tiny",), *, method: str | None = None, dps: int = 40, seed: int = 0,
                     progress: bool = False) -> list[CaseCertificate]:
    """Certify every case of ``keys`` (default: every registered mechanism) at ``sizes``.

    ``method=None`` picks :func:`default_method` per size. ``progress`` shows a tqdm bar on a
    terminal (stderr). A case that cannot be certified is returned with its ``error``.
    """
    from tqdm import tqdm

    mechanisms = registry.list_mechanisms() if keys is None else [registry.get(key) for key in keys]
    for size in sizes:
        registry.size_scale(size)  # validates
    jobs = [(m, size, case) for m in mechanisms for size in sizes for case in m.cases(size, seed)]
    results = []
    bar = tqdm(jobs, desc="certify", unit="case", disable=not (progress and sys.stderr.isatty()), leave=False)
    for mechanism, size, case in bar:
        bar.set_postfix_str(f"{mechanism.key} {size} {case.variant}", refresh=False)
        start = time.perf_counter()
        try:
            cert, error = certify_case(mechanism, case, method=method or default_method(size), dps=dps), None
        except CertificationError as err:
            cert, error = None, str(err)
        except Exception as err:  # noqa: BLE001 - a mechanism failing outright is reported, not fatal to the sweep
            cert, error = None, f"the mechanism failed: {type(err).__name__}: {err}"
        results.append(CaseCertificate(mechanism.key, size, case.variant, cert, error, time.perf_counter() - start))
    return results


def format_results(results: list[CaseCertificate]) -> str:
    """A plain-text table of :func:`certify_registry` results, one case a line."""
    rows = [("mechanism", "size", "case", "method", "max rel", "bound", "condition", "longdouble", "notes")]
    for r in results:
        c = r.certificate
        if c is None:
            rows.append((r.key, r.size, r.variant, "-", "-", "-", "-", "-", r.error or ""))
            continue
        bounded = [e for e in c.outputs if e.bound is not None]
        bound = max((e.bound / e.scale for e in bounded if e.scale), default=None)
        honoured = {True: "yes", None: "equal", False: "NO"}[c.honoured]
        rows.append((r.key, r.size, r.variant, c.method, f"{c.max_rel:.1e}",
                     "-" if bound is None else f"{bound:.1e}" + ("" if c.within_bound else " EXCEEDED"),
                     "-" if c.condition is None else f"{c.condition:.3g}", honoured, "; ".join(c.notes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows).rstrip()


def add_parser(sub: Any) -> None:
    """Add ``certify`` to the ``reflex`` command's subparsers (called by :mod:`reflex.cli`)."""
    parser = sub.add_parser("certify", help="float64 error against longdouble / mpmath, per registry case",
                            description="Run each registry case in float64 and in higher precision and report the "
                                        "error (docs/precision.md). Exit 1 when a case exceeds its bound, longdouble "
                                        "is not honoured, or a mechanism fails.")
    parser.add_argument("keys", nargs="*", metavar="KEY", help="mechanism keys (default: every registered mechanism)")
    parser.add_argument("--sizes", default="tiny", help="comma-separated sizes: tiny, small, medium, large (default tiny)")
    parser.add_argument("--method", choices=METHODS, help="default: mpmath where it has the formula for tiny, "
                                                          "longdouble otherwise")
    parser.add_argument("--dps", type=int, default=40, help="mpmath decimal digits (default 40, at least 30)")
    parser.add_argument("--seed", type=int, default=0, help="case seed (default 0)")
    parser.set_defaults(handler=_cmd_certify)


def _cmd_certify(args: argparse.Namespace) -> int:
    sizes = [part.strip() for part in args.sizes.split(",") if part.strip()]
    start = time.perf_counter()
    try:
        if args.dps < 30:
            raise ValueError(f"--dps must be at least 30; got {args.dps}")
        results = certify_registry(args.keys or None, sizes, method=args.method, dps=args.dps, seed=args.seed, progress=True)
    except (KeyError, ValueError) as err:
        print(f"reflex: {err.args[0]}", file=sys.stderr)
        return 2
    print(format_results(results))
    certified = [r for r in results if r.certificate is not None]
    flagged = [r for r in certified if r.certificate.flagged]
    failed = [r for r in results if r.error and r.error.startswith("the mechanism failed")]
    worst = max(certified, key=lambda r: r.certificate.max_rel, default=None)
    worst_text = "" if worst is None else (f"; worst relative error {worst.certificate.max_rel:.1e} "
                                           f"({worst.key} {worst.size} {worst.variant})")
    print(f"certified {len(certified)} of {len(results)} cases of {len({r.key for r in results})} mechanism(s) in "
          f"{time.perf_counter() - start:.1f} s{worst_text}; {len(flagged)} flagged, {len(failed)} failed")
    return 1 if flagged or failed else 0
