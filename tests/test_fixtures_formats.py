"""Fixtures at kernel shapes (shape overrides), in .safetensors, with gradients (issues 19 and 12)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy
import pytest

import reflex
from reflex import fixture_schema, fixtures, registry
from reflex.backends import npz, safetensors_file
from reflex.fixtures import FixtureError
from reflex.mechanisms import _cases
from reflex.testing import TOLERANCES


N = len(reflex.get("full").cases("tiny", 0))  # cases of full per size


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------ shape overrides


def test_case_shape_reaches_dims_and_qkv_and_is_undone():
    assert fixture_schema.SHAPE_LETTERS == _cases.SHAPE_LETTERS  # the manifest's letters are case_shape's
    assert _cases.dims("tiny") == {"L": 4, "S": 7, "D": 8, "E": 6, "H": 4, "G": 2, "B": 2}
    with _cases.case_shape(L=129, D=64, H=8, B=1):
        assert _cases.dims("tiny") == {"L": 129, "S": 129, "D": 64, "E": 64, "H": 8, "G": 2, "B": 1}
        assert _cases.qkv(0, heads=8, kv_heads=2, length=3, key_length=3, dim=2, value_dim=2)["q"].shape == (1, 8, 3, 2)
        with _cases.case_shape(H=3):
            assert _cases.dims("tiny")["G"] == 1  # odd H without G: MQA
    assert _cases.dims("small")["L"] == 16 and _cases.standard("tiny", 0)[1]["q"].shape == (2, 4, 4, 8)
    with pytest.raises(ValueError, match="unknown letter 'S'"):
        with _cases.case_shape(S=3):
            pass
    with pytest.raises(ValueError, match="D must be a positive int; got 0"):
        with _cases.case_shape(D=0):
            pass
    with pytest.raises(ValueError, match="kv heads G = 3 must divide query heads H = 4"):
        with _cases.case_shape(G=3):
            pass


def test_lengths_and_head_dims_reach_the_cases(tmp_path):
    manifest = fixtures.generate(tmp_path, ["full"], ["tiny"], shapes={"head_dims": [64], "lengths": [129, 5]})
    assert manifest["shapes"] == {"lengths": [5, 129], "head_dims": [64]}  # sorted, in option order
    ids = [c["id"] for c in manifest["cases"]]
    assert ids[:2] == ["full-mha-0-L5_D64", "full-gqa-0-L5_D64"] and "full-softcap-0-L129_D64" in ids
    assert len(ids) == 2 * N and manifest["skipped"] == []
    fixture_set = fixtures.load(tmp_path)
    case = fixture_set["full-gqa-0-L129_D64"]
    assert case.shape == {"L": 129, "D": 64} and case.size == "tiny"
    assert case.inputs["q"].shape == (2, 4, 129, 64) and case.inputs["k"].shape == (2, 2, 129, 64)
    assert case.output.shape == (2, 4, 129, 64)
    assert fixture_set["full-mask-0-L5_D64"].inputs["mask"].shape == (2, 4, 5, 5)
    report = fixtures.verify(tmp_path)
    assert len(report) == 2 * N and all(r.identical for r in report)


def test_heads_kv_heads_and_batch(tmp_path):
    manifest = fixtures.generate(tmp_path, ["full"], ["tiny"], shapes={"heads": [8], "kv_heads": [1], "batch": [1]})
    cases = {c["id"]: c for c in manifest["cases"]}
    assert cases["full-gqa-0-B1_H8_G1"]["arrays"]["input.k"]["shape"] == [1, 1, 7, 8]
    assert cases["full-mha-0-B1_H8_G1"]["arrays"]["input.k"]["shape"] == [1, 8, 7, 8]  # MHA variant: G = H
    # full's mask and bias variants draw (2, H, L, S) arrays: at B = 1 they are skipped, with the reason
    skipped = {(s["variant"], s["reason"].split(":")[0]) for s in manifest["skipped"]}
    assert {("mask", "ValueError"), ("bias", "ValueError")} <= skipped
    assert all(s["shape"] == {"B": 1, "H": 8, "G": 1} and "does not broadcast" in s["reason"] for s in manifest["skipped"])
    fixtures.verify(tmp_path)


def test_a_case_builder_that_ignores_the_shape_is_skipped_not_adjusted(tmp_path):
    manifest = fixtures.generate(tmp_path, ["axial", "full"], ["tiny"], shapes={"lengths": [9]})
    assert {c["mechanism"] for c in manifest["cases"]} == {"full"}
    reasons = {s["variant"]: s["reason"] for s in manifest["skipped"] if s["mechanism"] == "axial"}
    assert set(reasons) == {c.variant for c in reflex.get("axial").cases("tiny", 0)}
    assert all(r.startswith("its case builder does not build the requested shape L9 (k (2, 2, 12, 8)") for r in reasons.values())
    with pytest.raises(FixtureError, match="every case was skipped at the requested shapes"):
        fixtures.generate(tmp_path / "none", ["axial"], ["tiny"], shapes={"lengths": [9]})


def test_shapes_are_deterministic_and_order_insensitive(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fixtures.generate(a, ["full"], ["tiny"], seed=2, shapes={"lengths": [3, 6], "heads": [2]})
    fixtures.generate(b, ["full"], ["tiny"], seed=2, shapes={"heads": [2, 2], "lengths": [6, 3]})
    assert _bytes(a) == _bytes(b)


@pytest.mark.parametrize("shapes, match", [
    ({"length": [3]}, "unknown option 'length'"),
    ({"lengths": []}, "non-empty list of positive ints"),
    ({"lengths": [0]}, "non-empty list of positive ints"),
    ({"lengths": [True]}, "non-empty list of positive ints"),
    ({"heads": [6], "kv_heads": [4]}, "kv heads 4 do not divide query heads 6"),
    ({"kv_heads": [3]}, "kv heads 3 do not divide query heads 4"),
])
def test_bad_shape_options_are_refused_before_writing(tmp_path, shapes, match):
    with pytest.raises(ValueError, match=match):
        fixtures.generate(tmp_path, ["full"], ["tiny"], shapes=shapes)
    assert not any(tmp_path.iterdir())


def test_dtypes_choose_the_recorded_tolerances(tmp_path):
    manifest = fixtures.generate(tmp_path, ["full"], ["tiny"], dtypes=["bfloat16", "float64"])
    assert manifest["dtypes"] == ["float64", "bfloat16"]
    assert set(manifest["cases"][0]["tolerances"]) == {"float64", "bfloat16"}
    case = fixtures.load(tmp_path)["full-gqa-0"]
    report = fixtures.check(tmp_path, {"full-gqa-0": case.output.astype(numpy.float32)})
    assert not report.passed and "no tolerance recorded for dtype 'float32'" in report.failed[0].message
    assert fixtures.check(tmp_path, {"full-gqa-0": case.output.astype(numpy.float32)}, dtype="bfloat16").passed
    with pytest.raises(ValueError, match="dtypes must be a non-empty list among"):
        fixtures.generate(tmp_path, ["full"], ["tiny"], dtypes=["int8"])


# ------------------------------------------------------------------------------------ safetensors


def test_safetensors_sets_round_trip_and_verify(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    manifest = fixtures.generate(a, ["full"], ["tiny"], format="safetensors")
    fixtures.generate(b, ["full"], ["tiny"], format="safetensors")
    assert _bytes(a) == _bytes(b) and manifest["format"] == "safetensors"
    assert sorted(p.suffix for p in a.iterdir() if p.suffix != ".json") == [".safetensors"] * N + [".sha256"]
    npz_set = fixtures.load(fixtures.generate(tmp_path / "n", ["full"], ["tiny"]) and tmp_path / "n")
    st_set = fixtures.load(a)
    assert st_set.format == "safetensors" and st_set.ids == npz_set.ids
    for st_case, npz_case in zip(st_set, npz_set):
        assert st_case.inputs.keys() == npz_case.inputs.keys() and st_case.outputs.keys() == npz_case.outputs.keys()
        for name in st_case.inputs:
            assert st_case.inputs[name].dtype == npz_case.inputs[name].dtype
            numpy.testing.assert_array_equal(st_case.inputs[name], npz_case.inputs[name])
        numpy.testing.assert_array_equal(st_case.output, npz_case.output)
    assert all(r.identical for r in fixtures.verify(a))


def test_safetensors_files_read_by_the_safetensors_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    fixtures.generate(tmp_path, ["full"], ["tiny"], format="safetensors")
    case = fixtures.load(tmp_path)["full-mask-0"]
    theirs = safetensors_numpy.load_file(str(tmp_path / "full-mask-0.safetensors"))
    assert theirs["input.mask"].dtype == numpy.bool_ and theirs["output"].dtype == numpy.float64
    numpy.testing.assert_array_equal(theirs["input.mask"], case.inputs["mask"])
    numpy.testing.assert_array_equal(theirs["lse"], case.lse)
    written = tmp_path / "theirs.safetensors"  # and the package's files read by reflex
    safetensors_numpy.save_file({"a": numpy.arange(6.0).reshape(2, 3), "b": numpy.array([True, False])}, str(written))
    arrays, dtypes = safetensors_file.read_tensors(written.read_bytes(), "theirs")
    numpy.testing.assert_array_equal(arrays["a"], numpy.arange(6.0).reshape(2, 3))
    assert dtypes == {"a": "float64", "b": "bool"} and not arrays["a"].flags.writeable


def _st(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@pytest.mark.parametrize("data, match", [
    (b"1234", "shorter than its 8-byte header length"),
    (_st({}, length=2**40), "header of 1099511627776 bytes"),
    (struct.pack("<Q", 2) + b"[]", "the header is not a JSON object"),
    (_st({"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "needs 16 bytes"),
    (_st({"a": {"dtype": "F64", "shape": [1], "data_offsets": [8, 16]}}, b"\0" * 16), "starts at byte 8"),
    (_st({"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 9), "1 bytes that no tensor covers"),
    (_st({"a": {"dtype": "O", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype 'O': unknown"),
    (_st({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "float8 is not readable"),
    (_st({"a": {"dtype": "F64", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8), "malformed shape"),
    (_st({"a": {"dtype": "F64", "shape": [1]}}), "exactly dtype, shape and data_offsets"),
    (struct.pack("<Q", 18) + b'{"a":1,"a":2}     ', "duplicate tensor names"),
    (struct.pack("<Q", 9) + b'{"a":NaN}', "JSON does not allow"),
])
def test_hostile_safetensors_are_refused(data, match):
    with pytest.raises(npz.NpzError, match=match):
        safetensors_file.read_tensors(data, "file")


def test_check_reads_safetensors_exports_with_bfloat16(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    folder = tmp_path / "set"
    fixtures.generate(folder, ["full"], ["tiny"])
    fixture_set = fixtures.load(folder)
    exported = tmp_path / "out.safetensors"
    safetensors_torch.save_file({c.id: torch.from_numpy(c.output.copy()).to(torch.bfloat16) for c in fixture_set},
                               str(exported))
    report = fixtures.check(folder, exported)
    assert report.passed and {r.dtype for r in report.results} == {"bfloat16"}
    assert all(r.margin <= 1 for r in report.results)
    float32 = tmp_path / "f32.safetensors"
    float32.write_bytes(safetensors_file.safetensors_bytes([(c.id, c.output.astype(numpy.float32)) for c in fixture_set]))
    assert fixtures.check(folder, float32).passed
    with pytest.raises(FixtureError, match="must be an .npz or a .safetensors file"):
        fixtures.check(folder, tmp_path / "out.pt")


# ------------------------------------------------------------------------------------ gradients


def _with_vjp() -> str:
    if reflex.get("full").vjp is None:
        pytest.skip("full has no VJP in this tree")
    return "full"


def test_gradients_are_stored_seeded_and_recomputable(tmp_path):
    key = _with_vjp()
    folder = tmp_path / "set"
    manifest = fixtures.generate(folder, [key], ["tiny"], seed=3)
    fixture_set = fixtures.load(folder)
    bias = fixture_set["full-bias-0"]
    assert sorted(bias.entry["arrays"]) == ["d_lse", "d_out", "grad.bias", "grad.k", "grad.q", "grad.v", "input.bias",
                                            "input.k", "input.q", "input.v", "lse", "output"]
    mask = fixture_set["full-mask-0"]
    assert sorted(mask.grads) == ["k", "q", "v"] and "mask" in mask.inputs  # no gradient for a boolean mask
    d_out = reflex.random.normal(mask.output.shape, seed=(3, 7919, 1))
    d_lse = reflex.random.normal(mask.lse.shape, seed=(3, 7919, 2))
    numpy.testing.assert_array_equal(mask.cotangents["out"], d_out)
    numpy.testing.assert_array_equal(mask.cotangents["lse"], d_lse)
    again = reflex.vjp(key, dict(mask.inputs), d_out, d_lse=d_lse, **mask.params)
    for name in ("q", "k", "v"):
        numpy.testing.assert_array_equal(mask.grads[name], again[name])
        assert mask.grads[name].shape == mask.inputs[name].shape
    assert numpy.all(numpy.isfinite(mask.grads["q"]))  # fully masked rows: zero gradients, never NaN
    numpy.testing.assert_array_equal(mask.grads["q"][..., 0, :], 0.0)
    assert all(r.identical for r in fixtures.verify(folder))
    fixtures.generate(tmp_path / "again", [key], ["tiny"], seed=3)
    assert _bytes(tmp_path / "again") == _bytes(folder) and fixtures.digest(manifest) == fixture_set.digest


def test_verify_recomputes_gradients(tmp_path):
    _with_vjp()
    fixtures.generate(tmp_path, ["full"], ["tiny"])
    case = fixtures.load(tmp_path)["full-gqa-0"]
    members = sorted({**{f"input.{n}": a for n, a in case.inputs.items()}, **case.outputs,
                      **{f"d_{n}": a for n, a in case.cotangents.items()},
                      **{f"grad.{n}": a for n, a in case.grads.items()}, "grad.k": case.grads["k"] * (1 + 1e-9)}.items())
    data = npz.npz_bytes(members)
    (tmp_path / case.file).write_bytes(data)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = next(c for c in manifest["cases"] if c["id"] == case.id)
    entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / fixtures.DIGEST_FILE).unlink()
    with pytest.raises(FixtureError, match=r"case full-gqa-0: grad.k differs by up to"):
        fixtures.verify(tmp_path)


def test_check_compares_exported_gradients(tmp_path):
    _with_vjp()
    fixtures.generate(tmp_path, ["full"], ["tiny"])
    fixture_set = fixtures.load(tmp_path)
    exported = {}
    for case in fixture_set:
        exported[case.id] = case.output.astype(numpy.float32)
        exported.update({f"{case.id}.grad.{n}": g.astype(numpy.float32) for n, g in case.grads.items()})
    report = fixtures.check(tmp_path, exported)
    assert report.passed and {"output", "grad.q", "grad.k", "grad.v", "grad.bias"} <= {r.array for r in report.results}
    assert len(report.results) == N + sum(len(case.grads) for case in fixture_set)
    exported["full-gqa-0.grad.v"] = exported["full-gqa-0.grad.v"] * 1.01
    report = fixtures.check(tmp_path, exported)
    assert [(r.id, r.array) for r in report.failed] == [("full-gqa-0", "grad.v")]
    assert report.failed[0].margin > 1 and "FAIL full-gqa-0 grad.v:" in report.table()
    with pytest.raises(FixtureError, match=r"'full-gqa-0.grad.mask' \(did you mean 'full-gqa-0.grad.[qkv]'\?\)"):
        fixtures.check(tmp_path, {"full-gqa-0.grad.mask": exported["full-gqa-0.grad.q"]})


def test_mechanisms_without_a_vjp_store_no_gradients(tmp_path):
    full = reflex.get("full")
    registry.register(registry.Mechanism(key="fixture_no_vjp", function=full.function, family="Z. test",
                                         paper="test only", params={}, cases=full.cases, returns_lse=True))
    try:
        manifest = fixtures.generate(tmp_path, ["fixture_no_vjp"], ["tiny"])
    finally:
        registry._REGISTRY.pop("fixture_no_vjp", None)
    assert len(manifest["cases"]) == N
    assert not any(name.startswith(("grad.", "d_")) for c in manifest["cases"] for name in c["arrays"])


@pytest.fixture
def probe():
    """A test-only mechanism (full's forward) whose VJP covers only non-causal cases."""
    full = reflex.get("full")

    def vjp(inputs, d_out, *, d_lse=None, **params):
        if params.get("causal"):
            raise NotImplementedError("probe: causal cases have no VJP")
        out, lse = reflex.full_attention(inputs["q"], inputs["k"], inputs["v"], **params, return_lse=True)
        # a deliberately simple 'gradient' (not the true one): the mechanism is only a carrier for the test
        return {name: numpy.full(inputs[name].shape, float(numpy.sum(d_out * out)))
                for name in inputs if inputs[name].dtype.kind == "f"}

    def cases(size, seed):
        return [case for case in full.cases(size, seed) if case.variant in ("gqa", "causal_top_left")]

    mechanism = registry.Mechanism(key="fixture_probe", function=full.function, family="Z. test", paper="test only",
                                   params={}, cases=cases, returns_lse=True, vjp=vjp)
    registry.register(mechanism)
    try:
        yield mechanism
    finally:
        registry._REGISTRY.pop("fixture_probe", None)


def test_generic_gradients_for_any_registered_vjp(probe, tmp_path):
    manifest = fixtures.generate(tmp_path, ["fixture_probe"], ["tiny"])
    arrays = {c["variant"]: c["arrays"] for c in manifest["cases"]}
    assert {"d_out", "d_lse", "grad.q", "grad.k", "grad.v"} <= set(arrays["gqa"])
    assert not any(name.startswith(("grad.", "d_")) for name in arrays["causal_top_left"])  # NotImplementedError
    case = fixtures.load(tmp_path)["fixture_probe-gqa-0"]
    expected = float(numpy.sum(case.cotangents["out"] * case.output))
    numpy.testing.assert_array_equal(case.grads["q"], numpy.full(case.inputs["q"].shape, expected))
    assert all(r.identical for r in fixtures.verify(tmp_path))


def test_tolerances_of_every_dtype_are_recorded_by_default(tmp_path):
    manifest = fixtures.generate(tmp_path, ["full"], ["tiny"])
    assert manifest["dtypes"] == list(TOLERANCES)
