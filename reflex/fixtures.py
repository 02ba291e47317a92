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

This module writes (:func:`generate`); building cases lives in :mod:`reflex.fixture_build`,
recomputing in :mod:`reflex.fixture_verify`, reading in :mod:`reflex.fixture_set`, the schema in
:mod:`reflex.fixture_schema`, comparing exported outputs in :mod:`reflex.fixture_check`. Import
everything from here: their public names are re-exported.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy

import reflex
from reflex.backends import npz
from reflex.fixture_build import (DEFAULT_SIZES, DIGEST_FILE, _build, _dtypes, _file_bytes, _grid, _plan, _select,
                                  _shape_tag, _shapes, _sizes, _skip, _skip_order, case_id)
from reflex.fixture_build import _npz_bytes  # noqa: F401  (tests build consistent but wrong case files with it)
from reflex.fixture_check import CheckReport, CheckResult, check
from reflex.fixture_schema import FORMATS, MANIFEST, SCHEMA_VERSION, canonical_bytes, digest
from reflex.fixture_set import FixtureCase, FixtureError, FixtureSet, load
from reflex.fixture_verify import CaseVerification, VerifyReport, verify

__all__ = [
    "SCHEMA_VERSION", "MANIFEST", "DEFAULT_SIZES", "FORMATS", "DIGEST_FILE", "FixtureError", "FixtureCase",
    "FixtureSet", "generate", "load", "verify", "check", "case_id", "digest", "CaseVerification", "VerifyReport",
    "CheckResult", "CheckReport",
]

def generate(out_dir: str | os.PathLike[str], mechanisms: Iterable[str] | None = None,
             sizes: Sequence[str] = DEFAULT_SIZES, seed: int = 0, *, progress: bool = False,
             shapes: Mapping[str, Iterable[int]] | None = None, dtypes: Iterable[str] | None = None,
             format: str = "npz", certify: bool = False, client: Any = None) -> dict[str, Any]:
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
        client: a ``dask.distributed.Client`` (or a scheduler address): each case is computed as
            a Dask task (:func:`reflex.distributed.build_fixture_cases`) and the files are written
            here in the same order, so the set is byte-identical to the serial one.

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
    remote = None
    if client is not None:
        from reflex.distributed import build_fixture_cases

        remote = build_fixture_cases(client, plan.cases, dtypes, format, certify, progress=progress)
    bar = tqdm(plan.cases, desc="fixtures", unit="case", file=sys.stderr, disable=not progress, leave=True)
    for cid, size, shape, mechanism, case in bar:
        bar.set_postfix_str(cid, refresh=False)
        built, certificate = remote.pop(0) if remote is not None else (
            _build(cid, size, shape, mechanism, case, dtypes, format), None)
        if isinstance(built, str):
            skipped.append(_skip(mechanism.key, size, shape, case.variant, built))
            continue
        entry, members = built
        if certify:
            from reflex.certify import case_record, default_method

            entry["certificate"] = (certificate if remote is not None
                                    else case_record(mechanism, case, method=default_method(size)))
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
