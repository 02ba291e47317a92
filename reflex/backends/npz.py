"""Deterministic ``.npz`` writing and safe ``.npz`` reading, for golden fixtures (``docs/fixtures.md``).

An ``.npz`` here is a zip of ``.npy`` members (format version 1.0 when written). Guarantees:

- *Byte-identical output for identical arrays*: :func:`npz_bytes` stores members uncompressed, in
  the order given, with a fixed date, fixed attributes and a unix creator, so the same arrays give
  the same bytes on every platform; :func:`canonical` first makes every array a C-contiguous
  little-endian host copy.
- *Never unpickles*: :func:`read_members` parses each member's ``.npy`` header itself and refuses
  object, structured and other non-numeric dtypes (anything but bool, integer and floating) before
  NumPy reads any data; the data are then read with ``allow_pickle=False``.
- *Loud failures*: every problem (bad zip, non-``.npy`` or duplicate member, compressed member
  where ``stored_only``, refused dtype, manifest mismatch, corruption) raises :class:`NpzError`
  whose message starts with the caller's ``what``.

Imported directly (``from reflex.backends import npz``); :mod:`reflex.backends` does not load it.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy

from reflex.backends import to_numpy

__all__ = ["NpzError", "canonical", "npz_bytes", "write_atomic", "read_members"]

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can carry


class NpzError(ValueError):
    """An array cannot be written, or an ``.npz`` is malformed, refused or inconsistent."""


def canonical(array: Any, what: str) -> numpy.ndarray:
    """A C-contiguous little-endian host copy; only bool, integer and floating dtypes are written."""
    host = to_numpy(array) if not isinstance(array, numpy.ndarray) else array
    host = numpy.asarray(host)
    if host.dtype.kind not in "biuf":
        raise NpzError(f"{what} has dtype {host.dtype}; fixtures hold bool, integer and floating arrays only")
    return numpy.ascontiguousarray(host, dtype=host.dtype.newbyteorder("<"))


def npz_bytes(arrays: Sequence[tuple[str, numpy.ndarray]]) -> bytes:
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


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a hidden partial file and a rename: never a half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def read_members(data: bytes, what: str, *, expected: Mapping[str, Any] | None, stored_only: bool
                 ) -> dict[str, numpy.ndarray]:
    """Parse an ``.npz`` without ever unpickling; ``expected`` maps member → {dtype, shape} to enforce.

    Returns read-only arrays by member name (without ``.npy``). Every problem raises
    :class:`NpzError` starting with ``what``.
    """
    arrays: dict[str, numpy.ndarray] = {}
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise NpzError(f"{what}: not a readable .npz (corrupted or truncated): {err}") from None
    with archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise NpzError(f"{what}: duplicate members in the archive")
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise NpzError(f"{what}: unexpected member {info.filename!r} (only .npy members are allowed)")
            name = info.filename[:-4]
            if stored_only and info.compress_type != zipfile.ZIP_STORED:
                raise NpzError(f"{what}: member {name!r} is compressed; fixture files store members uncompressed")
            try:
                with archive.open(info) as stream:
                    _check_header(stream, what, name, expected)
                with archive.open(info) as stream:
                    array = numpy.lib.format.read_array(stream, allow_pickle=False)
            except NpzError:
                raise
            except Exception as err:  # zlib, CRC (BadZipFile), short reads, bad headers: all say "corrupted"
                raise NpzError(f"{what}: member {name!r} is corrupted or truncated: {type(err).__name__}: {err}") from None
            array.setflags(write=False)
            arrays[name] = array
    if expected is not None:
        missing = sorted(set(expected) - set(arrays))
        if missing:
            raise NpzError(f"{what}: members {', '.join(missing)} listed in the manifest are missing")
    return arrays


def _check_header(stream: Any, what: str, name: str, expected: Mapping[str, Any] | None) -> None:
    """Read one member's ``.npy`` header and refuse its dtype (or a manifest mismatch) before any data."""
    version = numpy.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = numpy.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = numpy.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
        raise NpzError(f"{what}: member {name!r} has dtype {dtype}; refused (object arrays would be "
                       f"unpickled; only bool, integer and floating arrays are allowed)")
    if expected is not None:
        spec = expected.get(name)
        if spec is None:
            raise NpzError(f"{what}: member {name!r} is not listed in the manifest")
        if dtype.name != spec.get("dtype") or list(shape) != list(spec.get("shape", ())):
            raise NpzError(f"{what}: member {name!r} is {dtype.name} {tuple(shape)}; the manifest "
                           f"says {spec.get('dtype')} {tuple(spec.get('shape', ()))}")
