"""`reflex fixtures generate | verify | check`: shape options, formats, digests, --quiet, bars on terminals only."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy
import pytest

import reflex
from reflex import fixtures
from reflex.backends import safetensors_file
from reflex.cli import main


N = len(reflex.get("full").cases("tiny", 0))  # cases of full per size


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def generated(tmp_path, capsys) -> Path:
    folder = tmp_path / "set"
    code, out, err = _run(["fixtures", "generate", "--out", str(folder), "--mechanisms", "full", "--sizes", "tiny"], capsys)
    assert code == 0, err
    digest = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    assert out.splitlines()[-1] == f"set digest {digest}  (pin it: reflex fixtures verify {folder} --digest {digest})"
    return folder


def test_generate_shape_options_dtypes_and_format(tmp_path, capsys):
    folder = tmp_path / "set"
    code, out, err = _run(["fixtures", "generate", "--out", str(folder), "--mechanisms", "full,axial", "--sizes", "tiny",
                           "--lengths", "5,9", "--head-dims", "16", "--heads", "4", "--kv-heads", "1,2",
                           "--dtypes", "float32,float64", "--format", "safetensors"], capsys)
    assert code == 0, err
    fixture_set = fixtures.load(folder)
    assert fixture_set.format == "safetensors" and fixture_set.manifest["dtypes"] == ["float64", "float32"]
    assert fixture_set.manifest["shapes"] == {"heads": [4], "kv_heads": [1, 2], "lengths": [5, 9], "head_dims": [16]}
    assert fixture_set["full-gqa-0-H4_G1_L9_D16"].inputs["k"].shape == (2, 1, 9, 16)
    assert len(fixture_set) == 4 * N
    assert "skipped 12 case(s) that cannot take the requested shapes" in out
    assert "  axial rows_then_cols at tiny H4_G1_L5_D16: its case builder does not build the requested shape" in out
    assert "  ... and 2 more" in out and "100%" not in err  # stderr is not a terminal: no bar


def test_generate_quiet_prints_only_the_digest(tmp_path, capsys):
    code, out, err = _run(["fixtures", "generate", "--out", str(tmp_path), "--mechanisms", "full", "--sizes", "tiny",
                           "--quiet"], capsys)
    assert code == 0 and err == ""
    assert out == hashlib.sha256((tmp_path / "manifest.json").read_bytes()).hexdigest() + "\n"


def test_progress_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = _run(["fixtures", "generate", "--out", str(tmp_path), "--mechanisms", "full", "--sizes", "tiny"], capsys)
    assert code == 0 and "100%" in err and f"{N}/{N}" in err
    code, _, err = _run(["fixtures", "verify", str(tmp_path), "--quiet"], capsys)
    assert code == 0 and err == ""


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "128,x"], "argument --lengths: expected comma-separated positive integers; got '128,x'"),
    (["--head-dims", "0"], "argument --head-dims: expected comma-separated positive integers; got 0"),
    (["--heads", "6", "--kv-heads", "4"], "reflex: kv heads 4 do not divide query heads 6"),
    (["--dtypes", "int8"], "reflex: dtypes must be a non-empty list among"),
    (["--format", "pickle"], "argument --format: invalid choice: 'pickle'"),
])
def test_generate_usage_errors_are_one_line(tmp_path, capsys, argv, message):
    code, _, err = _run(["fixtures", "generate", "--out", str(tmp_path), "--mechanisms", "full", *argv], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_verify_digest_quiet_and_unlisted_files(generated, capsys):
    digest = fixtures.load(generated).digest
    code, out, err = _run(["fixtures", "verify", str(generated), "--digest", digest], capsys)
    assert code == 0 and out.startswith(f"verified {N} cases in {generated}: hashes match") and digest in out
    code, out, err = _run(["fixtures", "verify", str(generated), "--digest", "f" * 64], capsys)
    assert code == 1 and f"differs from the pinned {'f' * 64}" in err
    code, out, err = _run(["fixtures", "verify", str(generated), "--digest", "xyz"], capsys)
    assert code == 2 and "digest must be 64 hex digits" in err
    (generated / "extra.bin").write_bytes(b"?")
    code, out, err = _run(["fixtures", "verify", str(generated), "--quiet"], capsys)
    assert code == 0 and out == "" and "1 entries in" in err and "not listed in its manifest: extra.bin" in err


def test_verify_reports_tampering(generated, capsys):
    text = (generated / "manifest.json").read_text(encoding="utf-8")
    (generated / "manifest.json").write_text(text.replace('"atol": 1e-05', '"atol": 1000000000000.0', 1), encoding="utf-8")
    code, _, err = _run(["fixtures", "verify", str(generated)], capsys)
    assert code == 1 and "manifest field tolerances.float32.atol is 1000000000000.0; this reflex computes 1e-05" in err


def test_check_table_quiet_require_all_and_safetensors(generated, tmp_path, capsys):
    fixture_set = fixtures.load(generated)
    exported = tmp_path / "out.safetensors"
    exported.write_bytes(safetensors_file.safetensors_bytes([("full-gqa-0", fixture_set["full-gqa-0"].output)]))
    code, out, _ = _run(["fixtures", "check", str(generated), str(exported)], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0] == ("rule: |err| ≤ atol + rtol·|ref| per element; err/bound = max |err| / "
                                      "(atol + rtol·|ref|), PASS when ≤ 1")
    row = next(line for line in lines if line.startswith("full-gqa-0 "))
    assert row.split()[-2:] == ["1.00e-12", "PASS"] and "0.00e+00" in row
    assert lines[-1] == f"1 passed, 0 failed, {N - 1} not exported"
    code, out, _ = _run(["fixtures", "check", str(generated), str(exported), "--require-all"], capsys)
    assert code == 1 and any(line.startswith("full-mha-0 ") and line.endswith("NOT EXPORTED (FAIL)") for line in out.splitlines())
    assert out.splitlines()[-1] == (f"1 passed, {N - 1} failed, {N - 1} not exported (the {N - 1} not exported count as "
                                    f"failed: --require-all)")
    code, out, _ = _run(["fixtures", "check", str(generated), str(exported), "--require-all", "--quiet"], capsys)
    assert code == 1 and "rule:" not in out and out.splitlines()[0] == "FAIL full-mha-0 output: not exported (--require-all)"
    near = fixture_set["full-gqa-0"].output.astype(numpy.float32)
    numpy.savez(tmp_path / "near.npz", **{"full-gqa-0": near})
    code, out, _ = _run(["fixtures", "check", str(generated), str(tmp_path / "near.npz")], capsys)
    margin = float(next(line for line in out.splitlines() if line.startswith("full-gqa-0 ")).split()[4])
    assert code == 0 and 0 < margin <= 1  # the worst err/bound of a PASS row is at most 1
