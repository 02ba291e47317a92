"""Reading a golden fixture set: the manifest schema, :class:`FixtureCase`, :class:`FixtureSet`, :func:`load`.

The format is described in ``docs/fixtures.md`` and written by :func:`reflex.fixtures.generate`;
import everything from :mod:`reflex.fixtures`, which re-exports this module's public names.
Loading is safe: the manifest is size- and depth-bounded and validated field by field
(:mod:`reflex.fixture_schema`), an optional pinned set digest is checked first, file names cannot
leave the folder, every file's size and sha256 are checked before it is parsed, ``.npz`` members
are read by :mod:`reflex.backends.npz` and ``.safetensors`` tensors by
:mod:`reflex.backends.safetensors_file` (nothing is unpickled; object dtypes are refused before
NumPy sees them), and any malformed input raises :class:`FixtureError` naming the case or field.
Arrays are host NumPy arrays, read-only.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from reflex import registry
from reflex.backends import npz, safetensors_file
from reflex.fixture_schema import (MANIFEST, SCHEMA_VERSION, FixtureError, check_digest, digest, parse_manifest,
                                   validate)
from reflex.testing import Tolerance, dtype_name

__all__ = ["SCHEMA_VERSION", "MANIFEST", "FixtureError", "FixtureCase", "FixtureSet", "load"]

_HostArray = Any  # a read-only host numpy.ndarray (this module leaves NumPy to reflex.backends)

_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.(npz|safetensors)")


def _read_members(data: bytes, what: str, *, expected: Mapping[str, Any] | None, stored_only: bool
                  ) -> dict[str, _HostArray]:
    """:func:`reflex.backends.npz.read_members`, its errors raised as :class:`FixtureError`."""
    try:
        return npz.read_members(data, what, expected=expected, stored_only=stored_only)
    except npz.NpzError as err:
        raise FixtureError(str(err)) from None


def _read_tensors(data: bytes, what: str, *, expected: Mapping[str, Any] | None
                  ) -> tuple[dict[str, _HostArray], dict[str, str]]:
    """:func:`reflex.backends.safetensors_file.read_tensors` (names, dtypes and shapes checked against
    ``expected``), its errors raised as :class:`FixtureError`."""
    try:
        arrays, dtypes = safetensors_file.read_tensors(data, what)
    except npz.NpzError as err:
        raise FixtureError(str(err)) from None
    if expected is not None:
        for name, array in arrays.items():
            spec = expected.get(name)
            if spec is None:
                raise FixtureError(f"{what}: tensor {name!r} is not listed in the manifest")
            if dtypes[name] != spec["dtype"] or list(array.shape) != list(spec["shape"]):
                raise FixtureError(f"{what}: tensor {name!r} is {dtypes[name]} {tuple(array.shape)}; the manifest "
                                   f"says {spec['dtype']} {tuple(spec['shape'])}")
        missing = sorted(set(expected) - set(arrays))
        if missing:
            raise FixtureError(f"{what}: members {', '.join(missing)} listed in the manifest are missing")
    return arrays, dtypes


@dataclass(frozen=True)
class FixtureCase:
    """One loaded case: ``inputs``, ``outputs``, ``grads`` and ``cotangents`` are read-only host NumPy arrays.

    ``outputs`` holds ``output``, ``output.<i>`` and ``lse``; for a mechanism with a VJP,
    ``cotangents`` holds ``out`` (and ``lse``) — the seeded ``d_out``/``d_lse`` — and ``grads`` maps
    each floating input's name to its gradient (empty otherwise). ``shape`` is the case's shape
    override (``{"L": 128, "D": 64}``; empty at the named size's own shapes).
    """

    id: str
    mechanism: str
    variant: str
    size: str
    seed: int
    params: Mapping[str, Any]
    positional: tuple[str, ...]
    inputs: Mapping[str, _HostArray]
    outputs: Mapping[str, _HostArray]
    tolerances: Mapping[str, Tolerance]
    paper: str
    file: str
    entry: Mapping[str, Any] = field(repr=False, default_factory=dict)
    shape: Mapping[str, int] = field(default_factory=dict)
    grads: Mapping[str, _HostArray] = field(default_factory=dict)
    cotangents: Mapping[str, _HostArray] = field(default_factory=dict)

    @property
    def output(self) -> _HostArray:
        """The mechanism's output (``outputs["output"]``)."""
        return self.outputs["output"]

    @property
    def lse(self) -> _HostArray | None:
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

    @property
    def digest(self) -> str:
        """The set digest: SHA-256 hex of the canonical manifest bytes (pin it with ``load(..., digest=)``)."""
        return digest(self.manifest)

    @property
    def format(self) -> str:
        """``"npz"`` or ``"safetensors"``: the case files' format."""
        return self.manifest["format"]

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
    from reflex.fixture_schema import MAX_MANIFEST_BYTES

    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise FixtureError(f"{path}: {size} bytes; a manifest may hold at most {MAX_MANIFEST_BYTES}")
    manifest = parse_manifest(path.read_bytes(), str(path))
    validate(manifest, str(path))
    return manifest


def _case_path(folder: Path, cid: str, name: Any) -> Path:
    """The case's file, refusing anything but a plain file name inside ``folder``."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        raise FixtureError(f"case {cid}: file name {name!r} refused: it must be a plain .npz or .safetensors file "
                           f"name inside the fixture folder (no directories, '..' or absolute paths)")
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise FixtureError(f"case {cid}: file {name!r} resolves outside the fixture folder (symlink?); refused")
    if not path.is_file():
        raise FixtureError(f"case {cid}: file {name} is missing from {folder}")
    return path


def _load_case(folder: Path, entry: Mapping[str, Any], fmt: str) -> FixtureCase:
    cid = entry["id"]
    path = _case_path(folder, cid, entry["file"])
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise FixtureError(f"case {cid}: {entry['file']} has {size} bytes; the manifest records {entry['bytes']} "
                           f"(the file was modified or corrupted)")
    data = path.read_bytes()
    file_digest = hashlib.sha256(data).hexdigest()
    if file_digest != entry["sha256"]:
        raise FixtureError(f"case {cid}: {entry['file']} has sha256 {file_digest}; the manifest records "
                           f"{entry['sha256']} (the file was modified or corrupted)")
    what = f"case {cid} ({entry['file']})"
    if fmt == "npz":
        arrays = _read_members(data, what, expected=entry["arrays"], stored_only=True)
    else:
        arrays, _ = _read_tensors(data, what, expected=entry["arrays"])
    tolerances = {name: Tolerance(float(t["atol"]), float(t["rtol"])) for name, t in entry["tolerances"].items()}
    groups: dict[str, dict[str, _HostArray]] = {"input": {}, "grad": {}, "output": {}, "cotangent": {}}
    for name in sorted(arrays):
        if name.startswith(("input.", "grad.")):
            kind, _, short = name.partition(".")
            groups[kind][short] = arrays[name]
        elif name in ("d_out", "d_lse"):
            groups["cotangent"][name[2:]] = arrays[name]
        else:
            groups["output"][name] = arrays[name]
    return FixtureCase(
        id=cid, mechanism=entry["mechanism"], variant=entry["variant"], size=entry["size"], seed=entry["seed"],
        params=entry["params"], positional=tuple(entry["positional"]), inputs=groups["input"],
        outputs=groups["output"], tolerances=tolerances, paper=entry["paper"], file=entry["file"], entry=entry,
        shape=dict(entry["shape"]), grads=groups["grad"], cotangents=groups["cotangent"],
    )


def load(path: str | os.PathLike[str], *, digest: str | None = None) -> FixtureSet:
    """Load a fixture set, checking the schema, the pinned digest, every file name, size and sha256.

    ``digest``: the set digest you pinned (64 hex digits, as ``reflex fixtures generate`` printed it);
    a set whose canonical manifest hashes to anything else is refused before any case file is read.

    Raises :class:`FixtureError` naming the case for a missing, tampered, corrupted or malformed
    file, naming the field for a malformed manifest (or an unknown schema version), and naming both
    digests when the set digest differs from ``digest``; ``ValueError`` for a ``digest`` that is
    not 64 hex digits.
    """
    folder = Path(path)
    manifest = _read_manifest(folder)
    if digest is not None:
        check_digest(digest, _digest(manifest), str(folder / MANIFEST))
    fmt = manifest["format"]
    return FixtureSet(folder, manifest, [_load_case(folder, entry, fmt) for entry in manifest["cases"]])


_digest = digest  # load's keyword shadows the function's name
