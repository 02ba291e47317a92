"""The fixture manifest (schema 2): bounded parsing, strict validation, canonical bytes and the set digest.

Specified in ``docs/fixtures.md``. :func:`parse_manifest` bounds the file size and the JSON nesting
depth before parsing, refuses ``NaN``/``Infinity`` and duplicate keys, and :func:`validate` checks
every field's type and range, naming the field in a :class:`FixtureError`; nothing downstream
ever sees a malformed manifest. :func:`canonical_bytes` is the one serialisation reflex writes,
and :func:`digest` (the *set digest*) is its SHA-256: it pins the manifest and, through the
per-file hashes the manifest holds, every byte of the set.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Mapping

from reflex import registry

__all__ = ["SCHEMA_VERSION", "MANIFEST", "FORMATS", "SHAPE_LETTERS", "MAX_MANIFEST_BYTES", "MAX_DEPTH",
           "FixtureError", "parse_manifest", "validate", "canonical_bytes", "digest", "check_digest"]

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
FORMATS = {"npz": ".npz", "safetensors": ".safetensors"}
SHAPE_LETTERS = ("B", "H", "G", "L", "D")  # batch, query heads, kv heads, L = S, D = E
SHAPE_OPTIONS = {"batch": "B", "heads": "H", "kv_heads": "G", "lengths": "L", "head_dims": "D"}
MAX_MANIFEST_BYTES = 256 * 2**20
MAX_DEPTH = 32

_TOP = ("schema_version", "reflex_version", "numpy_version", "seed", "sizes", "mechanisms", "format", "dtypes",
        "shapes", "skipped", "cases")
_CASE = ("id", "mechanism", "variant", "size", "shape", "seed", "params", "positional", "file", "bytes", "sha256",
         "arrays", "tolerances", "paper")
_OPTIONAL_CASE = ("certificate",)  # written by `generate --certify` (reflex.certify.case_record); not recomputed by verify
_SKIPPED = ("mechanism", "size", "shape", "variant", "reason")
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
MEMBER = re.compile(rf"(input\.{_NAME}|output|output\.[1-9][0-9]*|lse|d_out|d_lse|grad\.{_NAME})")
CASE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
ARRAY_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                "float32", "float64")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class FixtureError(ValueError):
    """A fixture set or exported file is missing, malformed, tampered with or inconsistent."""


# ----------------------------------------------------------------------------------------------- parsing


_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in ``data`` (strings skipped), without parsing it."""
    depth = deepest = 0
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def parse_manifest(data: bytes, what: str) -> dict[str, Any]:
    """``data`` as a JSON object: size and nesting bounded first; NaN, Infinity and duplicate keys refused."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise FixtureError(f"{what}: {len(data)} bytes; a manifest may hold at most {MAX_MANIFEST_BYTES}")
    deepest = _depth(data)
    if deepest > MAX_DEPTH:
        raise FixtureError(f"{what}: JSON nested {deepest} levels deep; at most {MAX_DEPTH} are allowed")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in items]
        if len(set(keys)) != len(keys):
            duplicate = next(key for key in keys if keys.count(key) > 1)
            raise FixtureError(f"{what}: key {duplicate!r} appears twice in one object")
        return dict(items)

    def constant(name: str) -> Any:
        raise FixtureError(f"{what}: holds {name}, which is not JSON (numbers must be finite)")

    try:
        manifest = json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except FixtureError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: JSON syntax, huge integers
        raise FixtureError(f"{what}: not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise FixtureError(f"{what}: expected a JSON object at the top level; got {type(manifest).__name__}")
    return manifest


# ----------------------------------------------------------------------------------------------- validation


def _fail(field: str, expected: str, value: Any) -> FixtureError:
    shown = repr(value)
    return FixtureError(f"{field}: expected {expected}; got {shown if len(shown) <= 80 else shown[:77] + '...'}")


def _is_int(value: Any, low: int = 0) -> bool:
    return type(value) is int and value >= low


def _int(value: Any, field: str, low: int = 0) -> int:
    if not _is_int(value, low):
        raise _fail(field, f"an integer ≥ {low}", value)
    return value


def _str(value: Any, field: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        raise _fail(field, "a string" + (f" matching {pattern.pattern}" if pattern is not None else ""), value)
    return value


def _str_list(value: Any, field: str, allowed: tuple[str, ...] | None = None, *, empty: bool = False) -> list[str]:
    if not isinstance(value, list) or (not value and not empty) or not all(isinstance(v, str) for v in value):
        raise _fail(field, "a non-empty list of strings" if not empty else "a list of strings", value)
    if len(set(value)) != len(value):
        raise _fail(field, "no repeated entries", value)
    if allowed is not None and any(v not in allowed for v in value):
        raise _fail(field, f"entries among {', '.join(allowed)}", value)
    return value


def _exact_keys(value: Any, keys: tuple[str, ...], field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(field, "an object", value)
    missing = [k for k in keys if k not in value]
    extra = sorted(set(value) - set(keys))
    if missing:
        raise FixtureError(f"{field}: lacks {', '.join(missing)}")
    if extra:
        raise FixtureError(f"{field}: unexpected field(s) {', '.join(map(repr, extra))}")
    return value


def _shape(value: Any, field: str) -> dict[str, int]:
    if not isinstance(value, dict) or any(k not in SHAPE_LETTERS for k in value):
        raise _fail(field, f"an object with keys among {', '.join(SHAPE_LETTERS)}", value)
    for letter, n in value.items():
        _int(n, f"{field}.{letter}", 1)
    return value


def _finite(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _fail(field, "a finite number ≥ 0", value)
    return float(value)


def validate(manifest: Mapping[str, Any], what: str = MANIFEST) -> None:
    """Check every field of a parsed manifest; the first problem raises :class:`FixtureError` naming its field."""
    version = manifest.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise FixtureError(f"{what}: schema version {version!r} is not supported; this reflex reads schema "
                           f"{SCHEMA_VERSION} (the integer)")
    _exact_keys(manifest, _TOP, what)
    _str(manifest["reflex_version"], "reflex_version")
    _str(manifest["numpy_version"], "numpy_version")
    _int(manifest["seed"], "seed")
    sizes = _str_list(manifest["sizes"], "sizes", registry.SIZES)
    mechanisms = _str_list(manifest["mechanisms"], "mechanisms")
    for i, key in enumerate(mechanisms):
        _str(key, f"mechanisms[{i}]", re.compile(_NAME))
    fmt = manifest["format"]
    if fmt not in FORMATS:
        raise _fail("format", f"one of {', '.join(FORMATS)}", fmt)
    dtypes = _str_list(manifest["dtypes"], "dtypes")
    shapes = manifest["shapes"]
    if not isinstance(shapes, dict) or any(k not in SHAPE_OPTIONS for k in shapes):
        raise _fail("shapes", f"an object with keys among {', '.join(SHAPE_OPTIONS)}", shapes)
    for option, values in shapes.items():
        if not isinstance(values, list) or not values or not all(_is_int(v, 1) for v in values):
            raise _fail(f"shapes.{option}", "a non-empty list of positive integers", values)
    skipped = manifest["skipped"]
    if not isinstance(skipped, list):
        raise _fail("skipped", "a list", skipped)
    for i, entry in enumerate(skipped):
        field = f"skipped[{i}]"
        _exact_keys(entry, _SKIPPED, field)
        _str(entry["mechanism"], f"{field}.mechanism")
        _str(entry["reason"], f"{field}.reason")
        if entry["size"] not in sizes:
            raise _fail(f"{field}.size", f"one of {', '.join(sizes)}", entry["size"])
        if entry["variant"] is not None:
            _str(entry["variant"], f"{field}.variant")
        _shape(entry["shape"], f"{field}.shape")
    cases = manifest["cases"]
    if not isinstance(cases, list) or not cases:
        raise _fail("cases", "a non-empty list of case entries", cases)
    seen: set[str] = set()
    for position, entry in enumerate(cases):
        cid = entry.get("id") if isinstance(entry, dict) else None
        field = f"case {cid}" if isinstance(cid, str) and CASE_ID.fullmatch(cid) else f"cases[{position}]"
        _exact_keys({k: v for k, v in entry.items() if k not in _OPTIONAL_CASE}, _CASE, field)
        if "certificate" in entry and (not isinstance(entry["certificate"], dict)
                                       or not isinstance(entry["certificate"].get("method"), (str, type(None)))):
            raise _fail(f"{field}: certificate", "an object with a method (string or null)", entry["certificate"])
        _str(cid, f"{field}: id", CASE_ID)
        if cid in seen:
            raise FixtureError(f"case {cid} is listed twice")
        seen.add(cid)
        _validate_case(entry, field, sizes, mechanisms, dtypes, fmt)


def _validate_case(entry: Mapping[str, Any], field: str, sizes: list[str], mechanisms: list[str],
                   dtypes: list[str], fmt: str) -> None:
    if entry["mechanism"] not in mechanisms:
        raise _fail(f"{field}: mechanism", "one of the manifest's mechanisms", entry["mechanism"])
    _str(entry["variant"], f"{field}: variant")
    if entry["size"] not in sizes:
        raise _fail(f"{field}: size", f"one of the manifest's sizes ({', '.join(sizes)})", entry["size"])
    _shape(entry["shape"], f"{field}: shape")
    _int(entry["seed"], f"{field}: seed")
    if not isinstance(entry["params"], dict):
        raise _fail(f"{field}: params", "an object", entry["params"])
    _str(entry["paper"], f"{field}: paper")
    _int(entry["bytes"], f"{field}: bytes")
    _str(entry["sha256"], f"{field}: sha256", _HEX64)
    if not isinstance(entry["file"], str) or not entry["file"].endswith(FORMATS[fmt]):
        raise FixtureError(f"{field}: file name {entry['file']!r} refused: it must be a plain {FORMATS[fmt]} file "
                           f"name inside the fixture folder (format {fmt})")
    arrays = entry["arrays"]
    if not isinstance(arrays, dict) or "output" not in arrays:
        raise _fail(f"{field}: arrays", "an object listing at least 'output'", arrays)
    bad = [name for name in arrays if not MEMBER.fullmatch(name)]
    if bad:
        raise FixtureError(f"{field}: arrays lists unexpected array names {', '.join(map(repr, bad))}")
    for name, spec in arrays.items():
        _exact_keys(spec, ("dtype", "shape"), f"{field}: arrays.{name}")
        if spec["dtype"] not in ARRAY_DTYPES:
            raise _fail(f"{field}: arrays.{name}.dtype", f"one of {', '.join(ARRAY_DTYPES)}", spec["dtype"])
        if not isinstance(spec["shape"], list) or not all(_is_int(n) for n in spec["shape"]):
            raise _fail(f"{field}: arrays.{name}.shape", "a list of integers ≥ 0", spec["shape"])
    inputs = {name[len("input."):] for name in arrays if name.startswith("input.")}
    positional = entry["positional"]
    if not isinstance(positional, list) or not all(isinstance(p, str) and p in inputs for p in positional) \
            or len(set(positional)) != len(positional):
        raise _fail(f"{field}: positional", f"distinct names among the case's inputs ({', '.join(sorted(inputs))})",
                    positional)
    grads = [name for name in arrays if name.startswith("grad.")]
    if grads and "d_out" not in arrays:
        raise FixtureError(f"{field}: arrays holds gradients but no d_out")
    for name in grads:
        if f"input.{name[len('grad.'):]}" not in arrays:
            raise FixtureError(f"{field}: arrays holds {name} for an input the case does not have")
    tolerances = entry["tolerances"]
    if not isinstance(tolerances, dict) or sorted(tolerances) != sorted(dtypes):
        raise _fail(f"{field}: tolerances", f"an object with one entry per recorded dtype ({', '.join(dtypes)})",
                    tolerances)
    for name, tol in tolerances.items():
        _exact_keys(tol, ("atol", "rtol"), f"{field}: tolerances.{name}")
        _finite(tol["atol"], f"{field}: tolerances.{name}.atol")
        _finite(tol["rtol"], f"{field}: tolerances.{name}.rtol")


# ----------------------------------------------------------------------------------------------- digest


def canonical_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The manifest as reflex writes it: JSON, keys sorted, indent 1, UTF-8, final newline."""
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def digest(manifest: Mapping[str, Any]) -> str:
    """The set digest: SHA-256 hex of :func:`canonical_bytes` (= ``sha256sum manifest.json`` of a written set)."""
    return hashlib.sha256(canonical_bytes(manifest)).hexdigest()


def check_digest(expected: Any, actual: str, what: str) -> None:
    """Refuse ``actual`` unless it equals the pinned ``expected`` (64 hex digits, ``sha256:`` prefix allowed)."""
    if not isinstance(expected, str):
        raise TypeError(f"digest must be a string of 64 hex digits; got {type(expected).__name__}")
    pinned = expected.strip().lower().removeprefix("sha256:")
    if not _HEX64.fullmatch(pinned):
        raise ValueError(f"digest must be 64 hex digits (optionally prefixed sha256:); got {expected!r}")
    if pinned != actual:
        raise FixtureError(f"{what}: set digest {actual} differs from the pinned {pinned}: the set was modified, "
                           f"or is not the set that digest was taken of")
