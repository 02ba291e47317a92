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
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy

import reflex
from reflex import registry
from reflex.backends import to_numpy
from reflex.testing import TOLERANCES, Tolerance, _outside, _worst, dtype_name

__all__ = [
    "SCHEMA_VERSION", "MANIFEST", "DEFAULT_SIZES", "FixtureError", "FixtureCase", "FixtureSet",
    "generate", "load", "verify", "check", "case_id", "CaseVerification", "CheckResult", "CheckReport",
]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SIZES = ("tiny", "small")

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can carry
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.npz")
_MEMBER = re.compile(r"(input\.[A-Za-z_][A-Za-z0-9_]*|output|output\.[1-9][0-9]*|lse)")
_CASE_FIELDS = ("id", "mechanism", "variant", "size", "seed", "params", "positional", "file", "sha256", "arrays",
                "tolerances", "paper")


class FixtureError(ValueError):
    """A fixture set or exported file is missing, malformed, tampered with or inconsistent."""


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
    """A C-contiguous little-endian host copy; only bool, integer and floating dtypes are written."""
    host = to_numpy(array) if not isinstance(array, numpy.ndarray) else array
    host = numpy.asarray(host)
    if host.dtype.kind not in "biuf":
        raise FixtureError(f"{what} has dtype {host.dtype}; fixtures hold bool, integer and floating arrays only")
    return numpy.ascontiguousarray(host, dtype=host.dtype.newbyteorder("<"))


def _npz_bytes(arrays: Sequence[tuple[str, numpy.ndarray]]) -> bytes:
    """An uncompressed ``.npz`` with fixed entry metadata: the same arrays give the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays:
            member = io.BytesIO()
            numpy.lib.format.write_array(member, array, version=(1, 0), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # unix, whatever the platform
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


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
        data = _npz_bytes(members)
        _write_atomic(folder / f"{cid}.npz", data)
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
    _write_atomic(folder / MANIFEST, _manifest_bytes(manifest))
    return manifest


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------------------------- reading


def _read_members(data: bytes, what: str, *, expected: Mapping[str, Any] | None, stored_only: bool
                  ) -> dict[str, numpy.ndarray]:
    """Parse an ``.npz`` without ever unpickling; ``expected`` maps member → {dtype, shape} to enforce.

    Every problem raises FixtureError starting with ``what``.
    """
    arrays: dict[str, numpy.ndarray] = {}
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise FixtureError(f"{what}: not a readable .npz (corrupted or truncated): {err}") from None
    with archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise FixtureError(f"{what}: duplicate members in the archive")
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise FixtureError(f"{what}: unexpected member {info.filename!r} (only .npy members are allowed)")
            name = info.filename[:-4]
            if stored_only and info.compress_type != zipfile.ZIP_STORED:
                raise FixtureError(f"{what}: member {name!r} is compressed; fixture files store members uncompressed")
            try:
                with archive.open(info) as stream:
                    version = numpy.lib.format.read_magic(stream)
                    if version == (1, 0):
                        shape, fortran, dtype = numpy.lib.format.read_array_header_1_0(stream)
                    elif version == (2, 0):
                        shape, fortran, dtype = numpy.lib.format.read_array_header_2_0(stream)
                    else:
                        raise ValueError(f"unsupported .npy version {version}")
                    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
                        raise FixtureError(f"{what}: member {name!r} has dtype {dtype}; refused (object arrays would be "
                                           f"unpickled; only bool, integer and floating arrays are allowed)")
                    if expected is not None:
                        spec = expected.get(name)
                        if spec is None:
                            raise FixtureError(f"{what}: member {name!r} is not listed in the manifest")
                        if dtype.name != spec.get("dtype") or list(shape) != list(spec.get("shape", ())):
                            raise FixtureError(f"{what}: member {name!r} is {dtype.name} {tuple(shape)}; the manifest "
                                               f"says {spec.get('dtype')} {tuple(spec.get('shape', ()))}")
                with archive.open(info) as stream:
                    array = numpy.lib.format.read_array(stream, allow_pickle=False)
            except FixtureError:
                raise
            except Exception as err:  # zlib, CRC (BadZipFile), short reads, bad headers: all say "corrupted"
                raise FixtureError(f"{what}: member {name!r} is corrupted or truncated: {type(err).__name__}: {err}") from None
            array.setflags(write=False)
            arrays[name] = array
    if expected is not None:
        missing = sorted(set(expected) - set(arrays))
        if missing:
            raise FixtureError(f"{what}: members {', '.join(missing)} listed in the manifest are missing")
    return arrays


@dataclass(frozen=True)
class FixtureCase:
    """One loaded case: ``inputs`` and ``outputs`` are read-only host NumPy arrays."""

    id: str
    mechanism: str
    variant: str
    size: str
    seed: int
    params: Mapping[str, Any]
    positional: tuple[str, ...]
    inputs: Mapping[str, numpy.ndarray]
    outputs: Mapping[str, numpy.ndarray]
    tolerances: Mapping[str, Tolerance]
    paper: str
    file: str
    entry: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @property
    def output(self) -> numpy.ndarray:
        """The mechanism's output (``outputs["output"]``)."""
        return self.outputs["output"]

    @property
    def lse(self) -> numpy.ndarray | None:
        """The logsumexp per query row, where the mechanism defines one."""
        return self.outputs.get("lse")

    def tolerance(self, dtype: Any) -> Tolerance:
        """The recommended ``(atol, rtol)`` recorded for ``dtype`` (float64/float32/float16/bfloat16)."""
        name = dtype_name(dtype)
        if name not in self.tolerances:
            raise ValueError(f"case {self.id}: no tolerance recorded for dtype {name!r}; known: {', '.join(self.tolerances)}")
        return self.tolerances[name]

    def call(self, convert: Any = lambda a: a, **overrides: Any) -> Any:
        """Run the registered mechanism on this case's inputs (``convert`` moves each array)."""
        case = registry.Case(self.variant, dict(self.inputs), dict(self.params), self.positional, self.seed)
        return case.call(registry.get(self.mechanism), convert, **overrides)


class FixtureSet(Sequence[FixtureCase]):
    """The cases of a fixture folder, in manifest order; index by position or by case id."""

    def __init__(self, path: Path, manifest: Mapping[str, Any], cases: list[FixtureCase]):
        self.path = path
        self.manifest = manifest
        self.cases = cases
        self._by_id = {case.id: case for case in cases}

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[FixtureCase]:
        return iter(self.cases)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, str):
            try:
                return self._by_id[item]
            except KeyError:
                import difflib

                close = difflib.get_close_matches(item, self._by_id, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise KeyError(f"no case {item!r} in {self.path}{hint}") from None
        return self.cases[item]

    def __contains__(self, item: object) -> bool:
        return item in self._by_id if isinstance(item, str) else item in self.cases

    @property
    def ids(self) -> list[str]:
        return [case.id for case in self.cases]


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise FixtureError(f"{folder}: no such fixture folder")
    if not path.is_file():
        raise FixtureError(f"{folder}: no {MANIFEST}; not a fixture set")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FixtureError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise FixtureError(f"{path}: expected a JSON object at the top level")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise FixtureError(f"{path}: schema version {version!r} is not supported; this reflex reads schema {SCHEMA_VERSION}")
    cases = manifest.get("cases")
    if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
        raise FixtureError(f"{path}: 'cases' must be a list of objects")
    seen: set[str] = set()
    for position, entry in enumerate(cases):
        cid = entry.get("id")
        if not isinstance(cid, str) or not cid:
            raise FixtureError(f"{path}: case #{position} has no id")
        if cid in seen:
            raise FixtureError(f"{path}: case {cid} is listed twice")
        seen.add(cid)
        missing = [name for name in _CASE_FIELDS if name not in entry]
        if missing:
            raise FixtureError(f"case {cid}: manifest entry lacks {', '.join(missing)}")
        if not isinstance(entry["arrays"], dict) or "output" not in entry["arrays"]:
            raise FixtureError(f"case {cid}: manifest 'arrays' must be an object listing at least 'output'")
        bad = [name for name in entry["arrays"] if not _MEMBER.fullmatch(name)]
        if bad:
            raise FixtureError(f"case {cid}: manifest lists unexpected array names {', '.join(map(repr, bad))}")
    return manifest


def _case_path(folder: Path, cid: str, name: Any) -> Path:
    """The case's file, refusing anything but a plain file name inside ``folder``."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        raise FixtureError(f"case {cid}: file name {name!r} refused: it must be a plain .npz file name inside the "
                           f"fixture folder (no directories, '..' or absolute paths)")
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise FixtureError(f"case {cid}: file {name!r} resolves outside the fixture folder (symlink?); refused")
    if not path.is_file():
        raise FixtureError(f"case {cid}: file {name} is missing from {folder}")
    return path


def _load_case(folder: Path, entry: Mapping[str, Any]) -> FixtureCase:
    cid = entry["id"]
    path = _case_path(folder, cid, entry["file"])
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise FixtureError(f"case {cid}: {entry['file']} has sha256 {digest}; the manifest records {entry['sha256']} "
                           f"(the file was modified or corrupted)")
    arrays = _read_members(data, f"case {cid} ({entry['file']})", expected=entry["arrays"], stored_only=True)
    try:
        tolerances = {name: Tolerance(float(t["atol"]), float(t["rtol"])) for name, t in entry["tolerances"].items()}
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise FixtureError(f"case {cid}: malformed tolerances in the manifest: {err!r}") from None
    return FixtureCase(
        id=cid, mechanism=entry["mechanism"], variant=entry["variant"], size=entry["size"], seed=entry["seed"],
        params=entry["params"], positional=tuple(entry["positional"]),
        inputs={name[len("input."):]: a for name, a in arrays.items() if name.startswith("input.")},
        outputs={name: a for name, a in arrays.items() if not name.startswith("input.")},
        tolerances=tolerances, paper=entry["paper"], file=entry["file"], entry=entry,
    )


def load(path: str | os.PathLike[str]) -> FixtureSet:
    """Load a fixture set, checking the schema, every file name and every file's sha256.

    Raises :class:`FixtureError` naming the case for a missing, tampered, corrupted or malformed
    file, and naming the manifest for an unknown schema version.
    """
    folder = Path(path)
    manifest = _read_manifest(folder)
    return FixtureSet(folder, manifest, [_load_case(folder, entry) for entry in manifest["cases"]])


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
