"""Verifying a fixture set: :func:`verify` regenerates it from its manifest and reports every difference.

Import from :mod:`reflex.fixtures`, which re-exports these names. Format and guarantees:
``docs/fixtures.md``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


from reflex import registry
from reflex.fixture_build import (DIGEST_FILE, _build, _dtypes, _grid, _plan, _shape_tag, _shapes, _sizes, _skip,
                                  _skip_order)
from reflex.fixture_schema import MANIFEST
from reflex.fixture_set import FixtureCase, FixtureError, load
from reflex.testing import TOLERANCES, _outside
from reflex.backends import numpy_namespace

hnp = numpy_namespace()  # host NumPy (files, long double), through the backends layer

__all__ = ["verify", "CaseVerification", "VerifyReport"]


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


def _compare_case(stored: FixtureCase, entry: Mapping[str, Any], members: Sequence[tuple[str, hnp.ndarray]]
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
        same = bool(hnp.array_equal(again, kept, equal_nan=True))
        if name.startswith(("input.", "d_")):
            if not same:
                what = f"input {name[6:]}" if name.startswith("input.") else f"cotangent {name}"
                problems.append(f"{what} differs from the case builder's (stale fixtures?)")
            continue
        identical &= same
        error, bad = _outside(again, kept, tol.atol, tol.rtol)
        largest = float(hnp.max(error)) if error.size else 0.0
        worst = max(worst, largest)
        if hnp.any(bad):
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
