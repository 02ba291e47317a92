"""Fixture sets are tamper-evident as a whole (issue 11 item 5): verify rebuilds the manifest, the set
digest pins it, and every malformed manifest field is a FixtureError naming the field."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

import reflex
from reflex import fixture_schema, fixtures
from reflex.fixtures import FixtureError

CASE = "full-gqa-0"
N = len(reflex.get("full").cases("tiny", 0))  # cases of full per size


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("integrity") / "set"
    fixtures.generate(folder, ["full"], ["tiny"], seed=0)
    return folder


@pytest.fixture
def copy(tiny_set, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_set, tmp_path / "copy"))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def _write(folder: Path, manifest: dict) -> None:
    """Write ``manifest`` canonically and re-record its digest: only the content differs from the original."""
    data = fixture_schema.canonical_bytes(manifest)
    (folder / "manifest.json").write_bytes(data)
    (folder / fixtures.DIGEST_FILE).write_text(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n")


def _entry(manifest: dict, cid: str = CASE) -> dict:
    return next(c for c in manifest["cases"] if c["id"] == cid)


# ------------------------------------------------------------------------------------ the digest


def test_digest_is_the_sha256_of_the_manifest_file(tiny_set):
    data = (tiny_set / "manifest.json").read_bytes()
    pinned = hashlib.sha256(data).hexdigest()
    assert fixtures.load(tiny_set).digest == pinned == fixtures.digest(json.loads(data))
    assert (tiny_set / fixtures.DIGEST_FILE).read_text() == f"{pinned}  manifest.json\n"  # sha256sum -c format
    assert fixtures.load(tiny_set, digest=pinned).digest == pinned
    assert fixtures.load(tiny_set, digest=f"sha256:{pinned.upper()}").digest == pinned
    assert fixtures.verify(tiny_set, digest=pinned).digest == pinned


def test_a_pinned_digest_refuses_any_other_set(copy, tmp_path):
    pinned = fixtures.load(copy).digest
    other = tmp_path / "other"
    fixtures.generate(other, ["full"], ["tiny"], seed=1)  # a valid set, just not the pinned one
    with pytest.raises(FixtureError, match=f"set digest [0-9a-f]{{64}} differs from the pinned {pinned}"):
        fixtures.load(other, digest=pinned)
    with pytest.raises(FixtureError, match="differs from the pinned"):
        fixtures.verify(other, digest=pinned)
    with pytest.raises(FixtureError, match="differs from the pinned"):
        fixtures.check(other, {}, digest=pinned)
    manifest = _manifest(copy)
    _entry(manifest)["tolerances"]["float32"]["atol"] = 1e12  # consistent edit: only the digest notices at load
    _write(copy, manifest)
    with pytest.raises(FixtureError, match="differs from the pinned"):
        fixtures.load(copy, digest=pinned)
    with pytest.raises(ValueError, match="digest must be 64 hex digits"):
        fixtures.load(copy, digest="abc")
    with pytest.raises(TypeError, match="digest must be a string"):
        fixtures.load(copy, digest=123)


def test_the_digest_file_must_agree_with_the_manifest(copy):
    (copy / fixtures.DIGEST_FILE).write_text("0" * 64 + "  manifest.json\n")
    with pytest.raises(FixtureError, match="set: manifest.json.sha256 does not record the manifest's digest"):
        fixtures.verify(copy)


# ------------------------------------------------------------------------------------ verify recomputes the manifest


def _tampered(copy: Path, edit) -> str:
    manifest = _manifest(copy)
    edit(manifest)
    _write(copy, manifest)
    with pytest.raises(FixtureError) as info:
        fixtures.verify(copy)
    return str(info.value)


def test_loosened_tolerance_is_tampering(copy):
    """atol = 1e12 would make `fixtures check` pass garbage: verify names the field."""
    message = _tampered(copy, lambda m: _entry(m)["tolerances"]["float32"].update(atol=1e12))
    assert f"case {CASE}: manifest field tolerances.float32.atol is 1000000000000.0; this reflex computes 1e-05" in message
    report = fixtures.check(copy, {CASE: fixtures.load(copy)[CASE].output.astype("float32") + 1e6})
    assert report.passed  # what the tampered set would let through, hence verify


def test_swapped_positional_is_tampering(copy):
    message = _tampered(copy, lambda m: _entry(m).update(positional=["k", "q", "v"]))
    assert f'case {CASE}: manifest field positional is ["k", "q", "v"]; this reflex computes ["q", "k", "v"]' in message


def test_changed_params_is_tampering(copy):
    message = _tampered(copy, lambda m: _entry(m, "full-causal_top_left-0")["params"].update(causal="bottom_right"))
    assert "case full-causal_top_left-0: manifest field params" in message
    message = _tampered(copy, lambda m: _entry(m, "full-softcap-0")["params"].update(scale=1))  # 1 vs 1.0
    assert "case full-softcap-0: manifest field params" in message


def test_changed_paper_shape_or_arrays_is_tampering(copy):
    assert "manifest field paper" in _tampered(copy, lambda m: _entry(m).update(paper="Someone 2099"))
    assert "manifest field seed is 5; this reflex computes 0" in _tampered(copy, lambda m: _entry(m).update(seed=5))
    message = _tampered(copy, lambda m: _entry(m)["arrays"]["output"].update(shape=[1]))  # caught at load
    assert f"case {CASE} ({CASE}.npz): member 'output' is float64 (2, 4, 4, 6); the manifest says float64 (1,)" in message


def test_dropped_case_is_tampering(copy):
    message = _tampered(copy, lambda m: m["cases"].remove(_entry(m)))
    assert f"set: 1 case(s) that the recorded arguments generate are missing from the manifest: {CASE}" in message


def test_reordered_cases_are_tampering(copy):
    assert "not in the order generate writes them" in _tampered(copy, lambda m: m["cases"].reverse())


def test_changed_case_id_is_tampering(copy):
    (copy / f"{CASE}.npz").rename(copy / "full-renamed-0.npz")

    def rename(manifest):
        _entry(manifest).update(id="full-renamed-0", file="full-renamed-0.npz")

    message = _tampered(copy, rename)
    assert "case full-renamed-0: listed in the manifest, but its recorded arguments generate no such case" in message
    assert f"missing from the manifest: {CASE}" in message


def test_empty_case_list_is_refused(copy):
    manifest = _manifest(copy)
    manifest["cases"] = []
    _write(copy, manifest)
    with pytest.raises(FixtureError, match="cases: expected a non-empty list of case entries"):
        fixtures.load(copy)


def test_changed_generation_arguments_are_tampering(copy):
    message = _tampered(copy, lambda m: m.update(seed=1))
    assert "manifest field seed" in message or "input q differs" in message
    message = _tampered(copy, lambda m: m.update(shapes={"lengths": [9]}))
    assert "missing from the manifest" in message and "full-gqa-0-L9" in message
    message = _tampered(copy, lambda m: m.update(skipped=[{"mechanism": "full", "size": "tiny", "shape": {"L": 3},
                                                           "variant": None, "reason": "?"}]))
    assert "set: manifest field skipped does not list the cases" in message


def test_unlisted_files_are_reported(copy):
    (copy / "stray.npz").write_bytes(b"")
    (copy / "notes.txt").write_text("hello")
    report = fixtures.verify(copy)
    assert report.unlisted == ["notes.txt", "stray.npz"] and len(report) == N


# ------------------------------------------------------------------------------------ strict schema


def _refused(copy: Path, edit, match: str) -> None:
    manifest = _manifest(copy)
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(FixtureError, match=match):
        fixtures.load(copy)


@pytest.mark.parametrize("version", [True, 1.0, "2", None, 1, 3])
def test_schema_version_must_be_the_integer(copy, version):
    _refused(copy, lambda m: m.update(schema_version=version), f"schema version {version!r} is not supported")


@pytest.mark.parametrize("seed", ["0", 1.5, -1, True, None, [0]])
@pytest.mark.parametrize("where", ["set", "case"])
def test_malformed_seeds_name_the_field(copy, seed, where):
    if where == "set":
        _refused(copy, lambda m: m.update(seed=seed), r"^seed: expected an integer ≥ 0; got")
    else:
        _refused(copy, lambda m: _entry(m).update(seed=seed), rf"^case {CASE}: seed: expected an integer ≥ 0")


def test_nan_infinity_and_duplicate_keys_are_refused(copy):
    text = (copy / "manifest.json").read_text(encoding="utf-8")
    assert '\n "seed": 0,\n' in text
    (copy / "manifest.json").write_text(text.replace('\n "seed": 0,\n', '\n "seed": NaN,\n'), encoding="utf-8")
    with pytest.raises(FixtureError, match="holds NaN, which is not JSON"):
        fixtures.load(copy)
    (copy / "manifest.json").write_text(text.replace('"atol": 1e-05', '"atol": Infinity', 1), encoding="utf-8")
    with pytest.raises(FixtureError, match="holds Infinity"):
        fixtures.load(copy)
    (copy / "manifest.json").write_text(text.replace('"seed": 0,', '"seed": 0, "seed": 1,', 1), encoding="utf-8")
    with pytest.raises(FixtureError, match="key 'seed' appears twice"):
        fixtures.load(copy)
    (copy / "manifest.json").write_text(text.replace('"seed": 0,', '"seed": ' + "9" * 5000 + ",", 1), encoding="utf-8")
    with pytest.raises(FixtureError, match="not valid JSON"):
        fixtures.load(copy)


def test_deep_nesting_and_size_are_bounded_before_parsing(copy, monkeypatch):
    depth = 100_000  # json.loads would raise RecursionError
    (copy / "manifest.json").write_text('{"cases": ' + "[" * depth + "]" * depth + "}", encoding="utf-8")
    with pytest.raises(FixtureError, match=f"JSON nested {depth + 1} levels deep; at most 32"):
        fixtures.load(copy)
    (copy / "manifest.json").write_text('{"a": "' + "[" * 1000 + '"}', encoding="utf-8")  # brackets in a string
    with pytest.raises(FixtureError, match="schema version None"):
        fixtures.load(copy)
    monkeypatch.setattr(fixture_schema, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(FixtureError, match="a manifest may hold at most 100"):
        fixtures.load(copy)


@pytest.mark.parametrize("field, value, match", [
    ("positional", ["q", "q", "k"], "positional: expected distinct names"),
    ("positional", ["x"], "positional: expected distinct names among the case's inputs"),
    ("positional", "qkv", "positional"),
    ("params", [], "params: expected an object"),
    ("paper", 3, "paper: expected a string"),
    ("bytes", -1, "bytes: expected an integer ≥ 0"),
    ("sha256", "XYZ", "sha256: expected a string matching"),
    ("tolerances", {"float64": {"atol": 1e-12, "rtol": 1e-12}}, "tolerances: expected an object with one entry per"),
    ("shape", {"Q": 3}, "shape: expected an object with keys among B, H, G, L, D"),
    ("shape", {"L": 0}, r"shape.L: expected an integer ≥ 1"),
    ("size", "huge", "size: expected one of the manifest's sizes"),
    ("mechanism", "other", "mechanism: expected one of the manifest's mechanisms"),
    ("arrays", {"output": {"dtype": "object", "shape": [1]}}, r"arrays.output.dtype: expected one of bool"),
    ("arrays", {"output": {"dtype": "float64", "shape": [-1]}}, r"arrays.output.shape: expected a list"),
    ("surprise", 1, "unexpected field"),
])
def test_malformed_case_fields_name_the_field(copy, field, value, match):
    _refused(copy, lambda m: _entry(m).update({field: value}), f"case {CASE}: {match}")


@pytest.mark.parametrize("edit, match", [
    (lambda arrays: arrays.pop("d_out"), "arrays holds gradients but no d_out"),
    (lambda arrays: arrays.update({"grad.zz": {"dtype": "float64", "shape": [1]}}),
     "arrays holds grad.zz for an input the case does not have"),
])
def test_gradients_need_their_cotangent_and_input(copy, edit, match):
    if "d_out" not in _entry(_manifest(copy))["arrays"]:
        pytest.skip("full has no VJP in this tree")
    _refused(copy, lambda m: edit(_entry(m)["arrays"]), f"case {CASE}: {match}")


def test_tolerance_values_must_be_finite_non_negative_numbers(copy):
    for value in (-1.0, "1e-5", True, None):
        _refused(copy, lambda m: _entry(m)["tolerances"]["float32"].update(atol=value),
                 rf"case {CASE}: tolerances.float32.atol: expected a finite number ≥ 0")


@pytest.mark.parametrize("field, value, match", [
    ("sizes", [], "sizes: expected a non-empty list"),
    ("sizes", ["tiny", "tiny"], "sizes: expected no repeated entries"),
    ("format", "pickle", "format: expected one of npz, safetensors"),
    ("shapes", {"lengths": [0]}, r"shapes.lengths: expected a non-empty list of positive integers"),
    ("skipped", {}, "skipped: expected a list"),
    ("dtypes", "float64", "dtypes: expected a non-empty list of strings"),
    ("cases", {}, "cases: expected a non-empty list"),
])
def test_malformed_top_level_fields_name_the_field(copy, field, value, match):
    _refused(copy, lambda m: m.update({field: value}), f"^{match}")


def test_missing_and_unknown_top_level_fields(copy):
    _refused(copy, lambda m: m.pop("dtypes"), "lacks dtypes")
    _refused(copy, lambda m: m.update(dtypes=["float64", "float32", "float16", "bfloat16"], extra=1),
             "unexpected field.*'extra'")


def test_case_file_size_is_checked_before_it_is_read(copy):
    _refused(copy, lambda m: _entry(m).update(bytes=_entry(m)["bytes"] + 1), rf"case {CASE}: {CASE}.npz has \d+ bytes")


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=4), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=6)
_FIELDS = ("id", "mechanism", "variant", "size", "shape", "seed", "params", "positional", "file", "bytes", "sha256",
           "arrays", "tolerances", "paper")


@given(field=st.sampled_from(_FIELDS), value=_JSON)
def test_any_changed_case_field_is_refused_or_reported(tiny_set, tmp_path_factory, field, value):
    """Property: replacing any case field by any JSON value gives FixtureError from load or verify — never
    another exception, never a silent pass (unless the value is unchanged)."""
    folder = Path(shutil.copytree(tiny_set, tmp_path_factory.mktemp("hypothesis") / "set"))
    manifest = _manifest(folder)
    entry = _entry(manifest)
    if json.dumps(entry[field], sort_keys=True) == json.dumps(value, sort_keys=True):
        return
    entry[field] = value
    _write(folder, manifest)
    with pytest.raises(FixtureError):
        fixtures.verify(folder)
