"""Deterministic ``.safetensors`` writing and safe reading, for golden fixtures (``docs/fixtures.md``).

The safetensors format: an 8-byte little-endian unsigned header length N, N bytes of UTF-8 JSON
(``{name: {"dtype": "F64", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
offsets relative to the data buffer), then the data buffer, every byte of it covered by exactly
one tensor. Tensors are raw little-endian C-order bytes: nothing is ever unpickled, and C++, Rust,
CUDA and torch harnesses read it natively. This module implements the format itself (about a
page), so reflex needs no extra package; ``tests/test_fixtures_formats.py`` checks it against the
``safetensors`` package where that is installed.

- :func:`safetensors_bytes` writes members ordered by item size (largest first, keeping every
  tensor aligned to its item size; ties keep the given order), the header as compact JSON with
  sorted keys, padded with spaces to a multiple of 8 bytes: the same arrays give the same bytes.
- :func:`read_tensors` validates the header (bounded size, known dtype, offsets that tile the
  buffer exactly) before it reads any data. ``BF16`` tensors are widened exactly to float32 and
  their source dtype is reported as ``bfloat16``; float8 tensors are refused.

Every problem raises :class:`reflex.backends.npz.NpzError` (a ``ValueError``) starting with ``what``.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Sequence

import numpy

from reflex.backends.npz import NpzError

__all__ = ["safetensors_bytes", "read_tensors", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 100 * 2**20  # the limit of the reference implementation

_CODES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "uint32": "U32",
          "int32": "I32", "uint64": "U64", "int64": "I64", "float16": "F16", "float32": "F32", "float64": "F64"}
_DTYPES = {code: numpy.dtype(name).newbyteorder("<") for name, code in _CODES.items()}


def safetensors_bytes(arrays: Sequence[tuple[str, numpy.ndarray]]) -> bytes:
    """A ``.safetensors`` file holding ``arrays`` (C-contiguous little-endian host arrays, e.g. from ``canonical``)."""
    order = sorted(range(len(arrays)), key=lambda i: -arrays[i][1].dtype.itemsize)  # stable: ties keep order
    header: dict[str, Any] = {}
    chunks, offset = [], 0
    for i in order:
        name, array = arrays[i]
        code = _CODES.get(array.dtype.name)
        if code is None:
            raise NpzError(f"tensor {name!r} has dtype {array.dtype}; safetensors fixtures hold bool, integer and "
                           f"floating arrays only")
        data = numpy.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": code, "shape": [int(n) for n in array.shape], "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _header(data: bytes, what: str) -> tuple[dict[str, Any], int]:
    if len(data) < 8:
        raise NpzError(f"{what}: not a readable .safetensors file (shorter than its 8-byte header length)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or size > len(data) - 8:
        raise NpzError(f"{what}: not a readable .safetensors file (header of {size} bytes; the file has "
                       f"{len(data) - 8} after the length, the limit is {MAX_HEADER_BYTES})")
    raw = data[8:8 + size]
    if not raw.startswith(b"{"):
        raise NpzError(f"{what}: not a readable .safetensors file (the header is not a JSON object)")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in items]
        if len(set(keys)) != len(keys):
            raise NpzError(f"{what}: duplicate tensor names in the header")
        return dict(items)

    def constant(name: str) -> Any:
        raise NpzError(f"{what}: the header holds {name}, which JSON does not allow")

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except NpzError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise NpzError(f"{what}: not a readable .safetensors file (header is not valid JSON: {err})") from None
    if not isinstance(header, dict):
        raise NpzError(f"{what}: not a readable .safetensors file (the header is not a JSON object)")
    return header, 8 + size


def read_tensors(data: bytes, what: str) -> tuple[dict[str, numpy.ndarray], dict[str, str]]:
    """Parse a ``.safetensors`` file: ``({name: read-only array}, {name: source dtype name})``.

    The source dtype differs from the array's only for ``BF16`` (read as float32, reported as
    ``bfloat16``). Raises :class:`NpzError` for a malformed header, an unknown or float8 dtype,
    offsets that do not tile the data buffer, or a shape that disagrees with its byte count.
    """
    header, start = _header(data, what)
    buffer = memoryview(data)[start:]
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NpzError(f"{what}: __metadata__ must map strings to strings")
    spans, arrays, dtypes = [], {}, {}
    for name, spec in header.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise NpzError(f"{what}: tensor {name!r} must have exactly dtype, shape and data_offsets")
        code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if code not in _DTYPES and code != "BF16":
            refused = "float8 is not readable without ml_dtypes; export float32" if str(code).startswith("F8") else "unknown"
            raise NpzError(f"{what}: tensor {name!r} has dtype {code!r}: {refused}")
        if (not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(n) is int and n >= 0 for n in offsets) or offsets[0] > offsets[1]):
            raise NpzError(f"{what}: tensor {name!r} has a malformed shape {shape!r} or data_offsets {offsets!r}")
        itemsize = 2 if code == "BF16" else _DTYPES[code].itemsize
        count = 1
        for n in shape:
            count *= n
        if offsets[1] - offsets[0] != count * itemsize or offsets[1] > len(buffer):
            raise NpzError(f"{what}: tensor {name!r} of shape {tuple(shape)} and dtype {code} needs {count * itemsize} "
                           f"bytes; its data_offsets {offsets} give {offsets[1] - offsets[0]} (buffer {len(buffer)})")
        spans.append((offsets[0], offsets[1], name))
        raw = bytes(buffer[offsets[0]:offsets[1]])
        if code == "BF16":
            wide = numpy.frombuffer(raw, dtype="<u2").astype(numpy.uint32) << 16
            array, dtypes[name] = wide.view(numpy.float32).reshape(shape), "bfloat16"
        else:
            array = numpy.frombuffer(raw, dtype=_DTYPES[code]).reshape(shape).copy()
            dtypes[name] = array.dtype.name
        array.setflags(write=False)
        arrays[name] = array
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise NpzError(f"{what}: tensor {name!r} starts at byte {begin} of the data buffer; expected {position} "
                           f"(tensors must tile the buffer without gaps or overlaps)")
        position = end
    if position != len(buffer):
        raise NpzError(f"{what}: the data buffer has {len(buffer) - position} bytes that no tensor covers")
    return arrays, dtypes
