"""Golden fixtures: deterministic bytes, round trip, verify, check, refusal of bad or hostile input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import runpy
import shutil
import sys
import zipfile
from pathlib import Path

import numpy
import pytest

import reflex
from reflex import fixtures
from reflex.fixtures import FixtureError
from reflex.testing import TOLERANCES

ROOT = Path(__file__).resolve().parent.parent
CASE = "full-gqa-0"
N = len(reflex.get("full").cases("tiny", 0))  # cases of full per size


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    """``full`` at tiny size, seed 0: written once, copied by tests that tamper with it."""
    folder = tmp_path_factory.mktemp("fixtures") / "set"
    fixtures.generate(folder, ["full"], ["tiny"], seed=0)
    return folder


@pytest.fixture
def copy(tiny_set, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_set, tmp_path / "copy"))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def _replace(folder: Path, cid: str, data: bytes, **entry_updates) -> None:
    """Write ``data`` as case ``cid``'s file and record its true sha256, so only the content is bad."""
    manifest = _manifest(folder)
    entry = next(c for c in manifest["cases"] if c["id"] == cid)
    (folder / entry["file"]).write_bytes(data)
    entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), **entry_updates)
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def _edit_manifest(folder: Path, cid: str | None = None, **updates) -> None:
    manifest = _manifest(folder)
    target = manifest if cid is None else next(c for c in manifest["cases"] if c["id"] == cid)
    target.update(updates)
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def _members(case) -> dict:
    """Every member of a loaded case's file, by member name (inputs, outputs, cotangents, gradients)."""
    return {**{f"input.{n}": a for n, a in case.inputs.items()}, **case.outputs,
            **{f"d_{n}": a for n, a in case.cotangents.items()}, **{f"grad.{n}": a for n, a in case.grads.items()}}


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def _npy(array, allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    numpy.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ determinism


def test_two_runs_write_identical_bytes(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    fixtures.generate(first, ["full"], ["tiny", "small"], seed=3)
    fixtures.generate(second, ["full"], ("small", "tiny"), seed=3)  # order of sizes does not matter
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and "manifest.json" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    text = (first / "manifest.json").read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    with zipfile.ZipFile(first / "full-mha-1.npz") as archive:  # no timestamps, no compression
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    other = tmp_path / "c"
    fixtures.generate(other, ["full"], ["tiny"], seed=4)
    assert (other / "full-mha-0.npz").read_bytes() != (first / "full-mha-0.npz").read_bytes()


# ------------------------------------------------------------------------------------ format and round trip


def test_manifest_describes_every_case(tiny_set):
    manifest = _manifest(tiny_set)
    assert manifest["schema_version"] == fixtures.SCHEMA_VERSION
    assert manifest["reflex_version"] == reflex.__version__ and manifest["numpy_version"] == numpy.__version__
    assert manifest["mechanisms"] == ["full"] and manifest["sizes"] == ["tiny"] and manifest["seed"] == 0
    variants = [c.variant for c in reflex.get("full").cases("tiny", 0)]
    assert [c["id"] for c in manifest["cases"]] == [f"full-{v}-0" for v in variants]
    entry = next(c for c in manifest["cases"] if c["id"] == "full-mask-0")
    assert entry["mechanism"] == "full" and entry["variant"] == "mask" and entry["size"] == "tiny"
    assert entry["file"] == "full-mask-0.npz" and entry["positional"] == ["q", "k", "v"]
    assert entry["arrays"]["input.mask"] == {"dtype": "bool", "shape": [2, 4, 4, 7]}
    assert entry["arrays"]["lse"]["shape"] == entry["arrays"]["output"]["shape"][:-1]
    assert set(entry["tolerances"]) == set(TOLERANCES) and "Vaswani" in entry["paper"]
    assert entry["sha256"] == hashlib.sha256((tiny_set / entry["file"]).read_bytes()).hexdigest()
    causal = next(c for c in manifest["cases"] if c["id"] == "full-causal_top_left-0")
    assert causal["params"] == {"causal": "top_left"}


def test_plain_numpy_reads_a_case_without_reflex(tiny_set):
    with numpy.load(tiny_set / "full-bias-0.npz", allow_pickle=False) as data:
        stored = {"input.bias", "input.k", "input.q", "input.v", "lse", "output"}
        assert stored <= set(data.files) and all(n.startswith(("d_", "grad.")) for n in set(data.files) - stored)
        out = reflex.full_attention(data["input.q"], data["input.k"], data["input.v"], bias=data["input.bias"])
        numpy.testing.assert_array_equal(out, data["output"])


def test_load_round_trip(tiny_set):
    fixture_set = fixtures.load(tiny_set)
    assert len(fixture_set) == N and fixture_set.ids[0] == "full-mha-0" and CASE in fixture_set
    case = fixture_set[CASE]
    assert (case.mechanism, case.variant, case.size, case.seed, case.params) == ("full", "gqa", "tiny", 0, {})
    assert sorted(case.inputs) == ["k", "q", "v"] and sorted(case.outputs) == ["lse", "output"]
    out, lse = case.call(return_lse=True)
    numpy.testing.assert_array_equal(out, case.output)
    numpy.testing.assert_array_equal(lse, case.lse)
    assert case.tolerance("float32") == TOLERANCES["float32"] and case.tolerance(numpy.float16).atol == 5e-3
    with pytest.raises(ValueError, match="no tolerance recorded for dtype 'int8'"):
        case.tolerance("int8")
    with pytest.raises(ValueError, match="read-only"):
        case.inputs["q"][0, 0, 0, 0] = 1.0
    with pytest.raises(KeyError, match="did you mean full-gqa-0"):
        fixture_set["full-gqa-9"]
    mask = fixture_set["full-mask-0"]
    assert numpy.all(numpy.isneginf(mask.lse[..., 0])) and numpy.all(mask.output[..., 0, :] == 0)


def test_every_registered_mechanism_flows_through(tmp_path):
    manifest = fixtures.generate(tmp_path, sizes=["tiny"])
    keys = sorted(m.key for m in reflex.list_mechanisms())
    assert manifest["mechanisms"] == keys
    assert sorted({c["mechanism"] for c in manifest["cases"]}) == keys
    for entry in manifest["cases"]:
        mechanism = reflex.get(entry["mechanism"])
        assert ("lse" in entry["arrays"]) == mechanism.returns_lse, entry["id"]
    results = fixtures.verify(tmp_path)
    assert len(results) == len(manifest["cases"]) and all(r.ok and r.identical for r in results)


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(KeyError, match="did you mean full"):
        fixtures.generate(tmp_path, ["fulll"], ["tiny"])
    with pytest.raises(ValueError, match="size must be one of"):
        fixtures.generate(tmp_path, ["full"], ["huge"])
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        fixtures.generate(tmp_path, ["full"], ["tiny"], seed=-1)
    assert not (tmp_path / "manifest.json").exists()


# ------------------------------------------------------------------------------------ verify


def test_verify_passes_then_names_the_case_after_one_flipped_byte(copy):
    results = fixtures.verify(copy)
    assert [r.id for r in results] == fixtures.load(copy).ids and all(r.identical for r in results)
    path = copy / f"{CASE}.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(FixtureError, match=rf"case {CASE}: {CASE}.npz has sha256 [0-9a-f]{{64}}; the manifest records"):
        fixtures.verify(copy)


def test_verify_recomputes_outputs(copy):
    case = fixtures.load(copy)[CASE]
    arrays = {**_members(case), "output": case.output + 1e-9}
    _replace(copy, CASE, fixtures._npz_bytes(sorted(arrays.items())))  # a consistent but wrong file
    with pytest.raises(FixtureError, match=rf"1 of {N} cases fail verification: case {CASE}: output differs by up to 1\.0"):
        fixtures.verify(copy)


def test_verify_reports_stale_inputs(copy):
    case = fixtures.load(copy)[CASE]
    arrays = {**_members(case), "input.q": case.inputs["q"] * 2}
    _replace(copy, CASE, fixtures._npz_bytes(sorted(arrays.items())))
    with pytest.raises(FixtureError, match=rf"case {CASE}: input q differs from the case builder's"):
        fixtures.verify(copy)


def test_verify_names_an_unregistered_mechanism(copy):
    _edit_manifest(copy, mechanisms=["full", "no_such_mechanism"])
    _edit_manifest(copy, CASE, mechanism="no_such_mechanism")
    with pytest.raises(FixtureError, match=rf"case {CASE}: manifest field mechanism is \"no_such_mechanism\"; this reflex "
                                           rf"computes \"full\".*set: mechanism no_such_mechanism: unknown mechanism"):
        fixtures.verify(copy)


# ------------------------------------------------------------------------------------ bad and hostile input

_PICKLED = []


class _Payload:
    """Unpickling this would append to _PICKLED: the test proves it never happens."""

    def __reduce__(self):
        return (_PICKLED.append, ("unpickled!",))


def test_object_array_is_refused_and_never_unpickled(copy):
    hostile = numpy.array([_Payload(), None], dtype=object)
    data = _zip({"output.npy": _npy(hostile, allow_pickle=True)})
    arrays = next(c for c in _manifest(copy)["cases"] if c["id"] == CASE)["arrays"]
    _replace(copy, CASE, data, arrays={**arrays, "output": {"dtype": "float64", "shape": [2]}})
    with pytest.raises(FixtureError, match=rf"case {CASE} .*member 'output' has dtype object; refused"):
        fixtures.load(copy)
    assert _PICKLED == []


@pytest.mark.parametrize("name", ["../outside.npz", "/etc/passwd", "sub/full-gqa-0.npz", "..\\x.npz", ".hidden.npz",
                                  "full-gqa-0.npy", 7])
def test_file_names_cannot_escape_the_folder(copy, name):
    (copy.parent / "outside.npz").write_bytes((copy / f"{CASE}.npz").read_bytes())
    _edit_manifest(copy, CASE, file=name)
    with pytest.raises(FixtureError, match=rf"case {CASE}: file name .* refused"):
        fixtures.load(copy)


def test_symlink_out_of_the_folder_is_refused(copy):
    outside = copy.parent / "outside.npz"
    outside.write_bytes((copy / f"{CASE}.npz").read_bytes())
    (copy / f"{CASE}.npz").unlink()
    os.symlink(outside, copy / f"{CASE}.npz")
    with pytest.raises(FixtureError, match=rf"case {CASE}: file .* resolves outside the fixture folder"):
        fixtures.load(copy)


def test_truncated_file_is_a_clear_error(copy):
    data = (copy / f"{CASE}.npz").read_bytes()
    _replace(copy, CASE, data[: len(data) // 2])
    with pytest.raises(FixtureError, match=rf"case {CASE} \({CASE}.npz\): not a readable .npz \(corrupted or truncated\)"):
        fixtures.load(copy)


def test_corrupted_member_is_a_clear_error(copy):
    data = bytearray((copy / f"{CASE}.npz").read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo("output.npy")
    data[info.header_offset + 30 + len(info.filename) + 40] ^= 0xFF  # inside the array data: CRC mismatch
    _replace(copy, CASE, bytes(data))
    with pytest.raises(FixtureError, match=rf"case {CASE} .*member 'output' is corrupted or truncated"):
        fixtures.load(copy)


def test_members_must_match_the_manifest(copy):
    case = fixtures.load(copy)[CASE]
    members = {f"{n}.npy": _npy(a) for n, a in _members(case).items() if n not in ("output", "lse")}
    _replace(copy, CASE, _zip({**members, "output.npy": _npy(case.output.astype(numpy.float32)),
                               "lse.npy": _npy(case.lse)}))
    with pytest.raises(FixtureError, match=rf"case {CASE} .*member 'output' is float32 .*the manifest says float64"):
        fixtures.load(copy)
    _replace(copy, CASE, _zip({**members, "output.npy": _npy(case.output)}))
    with pytest.raises(FixtureError, match=rf"case {CASE} .*members lse listed in the manifest are missing"):
        fixtures.load(copy)


def test_hash_mismatch_names_the_case(copy):
    _edit_manifest(copy, CASE, sha256="0" * 64)
    with pytest.raises(FixtureError, match=rf"case {CASE}: .*the manifest records 0000"):
        fixtures.load(copy)


def test_missing_case_file_names_the_case(copy):
    (copy / f"{CASE}.npz").unlink()
    with pytest.raises(FixtureError, match=rf"case {CASE}: file {CASE}.npz is missing"):
        fixtures.load(copy)


def test_unknown_schema_version_and_broken_manifests(copy, tmp_path):
    _edit_manifest(copy, schema_version=99)
    with pytest.raises(FixtureError, match="schema version 99 is not supported; this reflex reads schema 2"):
        fixtures.load(copy)
    (copy / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(FixtureError, match="manifest.json: not valid JSON"):
        fixtures.load(copy)
    with pytest.raises(FixtureError, match="no manifest.json; not a fixture set"):
        fixtures.load(tmp_path)
    with pytest.raises(FixtureError, match="no such fixture folder"):
        fixtures.load(tmp_path / "absent")


def test_manifest_entry_missing_fields_names_the_case(copy):
    manifest = _manifest(copy)
    manifest["cases"].append(dict(manifest["cases"][0]))
    (copy / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(FixtureError, match=r"case full-mha-0 is listed twice"):
        fixtures.load(copy)
    manifest["cases"].pop()
    del manifest["cases"][1]["sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(FixtureError, match=rf"case {CASE}: lacks sha256"):
        fixtures.load(copy)


# ------------------------------------------------------------------------------------ check


def _exported(tiny_set, transform=lambda case, a: a, lse=False) -> dict:
    arrays = {}
    for case in fixtures.load(tiny_set):
        arrays[case.id] = transform(case, case.output)
        if lse:
            arrays[f"{case.id}.lse"] = case.lse
    return arrays


def test_check_passes_exact_and_float32_outputs(tiny_set, tmp_path):
    exported = tmp_path / "exported.npz"
    numpy.savez(exported, **_exported(tiny_set, lse=True))
    report = fixtures.check(tiny_set, exported)
    assert report.passed and len(report.results) == 2 * N and {r.status for r in report.results} == {"pass"}
    assert all(r.max_abs == 0 and r.dtype == "float64" for r in report.results)
    numpy.savez_compressed(exported, **_exported(tiny_set, lambda c, a: a.astype(numpy.float32)))
    report = fixtures.check(tiny_set, exported)
    assert report.passed and {r.dtype for r in report.results} == {"float32"}
    assert all(0 < r.max_abs < 1e-6 for r in report.results if r.id != "full-mask-0" or r.max_abs)
    assert f"{N} passed, 0 failed, 0 not exported" in report.table()


def test_check_fails_wrong_outputs_naming_the_case(tiny_set):
    def perturb(case, a):
        return a + 1e-3 if case.id == CASE else a.astype(numpy.float32)
    report = fixtures.check(tiny_set, _exported(tiny_set, perturb))
    assert not report.passed and [r.id for r in report.failed] == [CASE]
    bad = report.failed[0]
    assert bad.dtype == "float64" and bad.max_abs == pytest.approx(1e-3) and bad.worst
    assert f"FAIL {CASE} output: 192 of 192 elements outside atol 1e-12" in report.table()
    # the same error is fine at the bfloat16 tolerance (e.g. bf16 results saved as float32)
    assert fixtures.check(tiny_set, _exported(tiny_set, perturb), dtype="bfloat16").passed


def test_check_nan_partial_export_and_unknown_names(tiny_set):
    partial = {CASE: numpy.full_like(fixtures.load(tiny_set)[CASE].output, numpy.nan)}
    report = fixtures.check(tiny_set, partial)
    assert [r.status for r in report.results if r.id == CASE] == ["fail"] and report.failed[0].max_abs == numpy.inf
    good = {CASE: fixtures.load(tiny_set)[CASE].output}
    assert fixtures.check(tiny_set, good).passed
    assert not fixtures.check(tiny_set, good, require_all=True).passed
    assert not fixtures.check(tiny_set, {}).passed
    with pytest.raises(FixtureError, match=r"name no case of .*'full-gqa-00' \(did you mean 'full-gqa-0'\?\)"):
        fixtures.check(tiny_set, {"full-gqa-00": good[CASE]})
    wrong_shape = fixtures.check(tiny_set, {CASE: good[CASE][..., :2]})
    assert "shape" in wrong_shape.failed[0].message
    integers = fixtures.check(tiny_set, {CASE: good[CASE].astype(numpy.int64)})
    assert "not a tested floating dtype" in integers.failed[0].message
    with pytest.raises(ValueError, match="dtype must be one of"):
        fixtures.check(tiny_set, good, dtype="int8")


def test_check_refuses_hostile_exported_files(tiny_set, tmp_path):
    exported = tmp_path / "exported.npz"
    exported.write_bytes(_zip({f"{CASE}.npy": _npy(numpy.array([_Payload()], dtype=object), allow_pickle=True)}))
    with pytest.raises(FixtureError, match=rf"exported file .*member '{CASE}' has dtype object; refused"):
        fixtures.check(tiny_set, exported)
    assert _PICKLED == []
    exported.write_bytes(b"not a zip")
    with pytest.raises(FixtureError, match="not a readable .npz"):
        fixtures.check(tiny_set, exported)
    with pytest.raises(FixtureError, match="cannot read the exported file"):
        fixtures.check(tiny_set, tmp_path / "absent.npz")


# ------------------------------------------------------------------------------------ the torch consumer example


@pytest.fixture(scope="module")
def consumer_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("consumer") / "set"
    fixtures.generate(folder, ["full"], ["tiny", "small"])
    return folder


def _run_example(script: str, fixture_dir: Path, out: Path, capfd, monkeypatch) -> tuple[int, str]:
    """Run an example script as ``__main__`` in this process; its ``reflex fixtures check`` is a subprocess."""
    pytest.importorskip("torch")
    monkeypatch.setattr(sys, "argv", [script, str(fixture_dir), "--export", str(out)])
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    captured = capfd.readouterr()
    return exit_info.value.code, captured.out + captured.err


def _sdpa_cases(fixture_set) -> tuple[list[str], list[str]]:
    """(ids SDPA can express — options causal/scale, inputs q/k/v/mask/bias —, those of them without GQA)."""
    expressible = [case for case in fixture_set if set(case.params) <= {"causal", "scale"}
                   and set(case.inputs) <= {"q", "k", "v", "mask", "bias"}]
    return ([c.id for c in expressible],
            [c.id for c in expressible if c.inputs["k"].shape[-3] == c.inputs["q"].shape[-3]])


def test_torch_consumer_passes(consumer_set, tmp_path, capfd, monkeypatch):
    code, output = _run_example("torch_consumer.py", consumer_set, tmp_path / "torch.npz", capfd, monkeypatch)
    assert code == 0, output
    done, _ = _sdpa_cases(fixtures.load(consumer_set))
    left = 2 * N - len(done)
    assert f"exported {len(done)} cases" in output and f"{len(done)} passed, 0 failed, {left} not exported" in output
    assert (tmp_path / "torch.npz").is_file()


def test_broken_torch_consumer_fails_naming_the_gqa_cases(consumer_set, tmp_path, capfd, monkeypatch):
    code, output = _run_example("torch_consumer_broken.py", consumer_set, tmp_path / "broken.npz", capfd, monkeypatch)
    assert code == 1, output
    done, mha = _sdpa_cases(fixtures.load(consumer_set))
    assert f"{len(mha)} passed, {len(done) - len(mha)} failed, {2 * N - len(done)} not exported" in output
    assert "FAIL full-gqa-1 output:" in output and "FAIL full-mha" not in output
