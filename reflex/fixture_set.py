"""Reading a golden fixture set: the manifest schema, :class:`FixtureCase`, :class:`FixtureSet`, :func:`load`.

The format is described in ``docs/fixtures.md`` and written by :func:`reflex.fixtures.generate`;
import everything from :mod:`reflex.fixtures`, which re-exports this module's public names.
Loading is safe: file names cannot leave the folder, every file's sha256 is checked before it is
parsed, ``.npz`` members are read by :mod:`reflex.backends.npz` (nothing is unpickled; object
dtypes are refused before NumPy sees them), and any malformed input raises :class:`FixtureError`
naming the case. Arrays are host NumPy arrays, read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from reflex import registry
from reflex.backends import npz
from reflex.testing import Tolerance, dtype_name

__all__ = ["SCHEMA_VERSION", "MANIFEST", "FixtureError", "FixtureCase", "FixtureSet", "load"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

_HostArray = Any  # a read-only host numpy.ndarray (this module leaves NumPy to reflex.backends.npz)

_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.npz")
_MEMBER = re.compile(r"(input\.[A-Za-z_][A-Za-z0-9_]*|output|output\.[1-9][0-9]*|lse)")
_CASE_FIELDS = ("id", "mechanism", "variant", "size", "seed", "params", "positional", "file", "sha256", "arrays",
                "tolerances", "paper")


class FixtureError(ValueError):
    """A fixture set or exported file is missing, malformed, tampered with or inconsistent."""


def _read_members(data: bytes, what: str, *, expected: Mapping[str, Any] | None, stored_only: bool
                  ) -> dict[str, _HostArray]:
    """:func:`reflex.backends.npz.read_members`, its errors raised as :class:`FixtureError`."""
    try:
        return npz.read_members(data, what, expected=expected, stored_only=stored_only)
    except npz.NpzError as err:
        raise FixtureError(str(err)) from None


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
    inputs: Mapping[str, _HostArray]
    outputs: Mapping[str, _HostArray]
    tolerances: Mapping[str, Tolerance]
    paper: str
    file: str
    entry: Mapping[str, Any] = field(repr=False, default_factory=dict)

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
