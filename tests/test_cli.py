"""The ``reflex`` command line: list, run, info, fixtures generate|verify|check; exit codes and hints."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy
import pytest

import reflex
from reflex import fixtures
from reflex.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    count = len(reflex.list_mechanisms())
    assert out.splitlines()[0].split() == ["key", "family", "summary"] and f"{count} mechanisms" in out
    assert any(line.startswith("full ") for line in out.splitlines())


def test_run(capsys):
    assert main(["run", "full", "--seq", "16", "--heads", "2", "--dim", "8", "--implementation", "tiled"]) == 0
    out = capsys.readouterr().out
    assert "mechanism       full" in out and "output          (1, 2, 16, 8) float64" in out
    assert "implementation  tiled" in out and "checksum        sha256:" in out


@pytest.mark.parametrize("key", [m.key for m in reflex.list_mechanisms()])
def test_run_every_mechanism(key, capsys):
    """Every registered mechanism runs from the command line with no options beyond the sizes."""
    assert main(["run", key, "--seq", "16", "--heads", "2", "--dim", "8"]) == 0
    out = capsys.readouterr().out
    assert f"mechanism       {key}\n" in out
    (checksum,) = [line for line in out.splitlines() if line.startswith("checksum        sha256:")]
    assert numpy.isfinite(float(checksum.split(" sum ")[1]))


def test_run_same_checksum_on_every_backend(capsys):
    sums = []
    for backend in ("numpy", "array_api_strict"):
        assert main(["run", "full", "--seq", "8", "--heads", "1", "--dim", "4", "--backend", backend]) == 0
        sums.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("checksum")])
    assert sums[0] == sums[1]


def test_info(capsys):
    assert main(["info", "full"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("full: Scaled dot-product softmax attention")
    assert ".. math::" in out and "Vaswani" in out and "softcap" in out and "returns lse     yes" in out
    assert "reflex.full_attention(q" in out and "cases (tiny)    mha, gqa" in out


@pytest.mark.parametrize("argv", [["info", "fulll"], ["run", "fulll"],
                                  ["fixtures", "generate", "--out", "{tmp}", "--mechanisms", "full,fulll"]])
def test_unknown_mechanism_suggests_and_exits_2(argv, capsys, tmp_path):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert "unknown mechanism 'fulll'; did you mean full?" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys, tmp_path):
    assert main(["fixtures", "generate", "--out", str(tmp_path), "--sizes", "tiny,huge"]) == 2
    assert "size must be one of tiny, small, medium, large; got 'huge'" in capsys.readouterr().err
    for argv in ([], ["fixtures"], ["run"], ["run", "full", "--backend", "jax"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2


@pytest.fixture
def generated(tmp_path, capsys) -> Path:
    folder = tmp_path / "set"
    assert main(["fixtures", "generate", "--out", str(folder), "--mechanisms", "full", "--sizes", "tiny",
                 "--seed", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"wrote 7 cases of 1 mechanism(s) (sizes tiny, seed 2) to {folder}: ")
    assert "100%" in captured.err and "7/7" in captured.err  # the tqdm bar, on stderr
    return folder


def test_fixtures_generate_and_verify(generated, capsys):
    assert fixtures.load(generated).manifest["seed"] == 2
    assert main(["fixtures", "verify", str(generated)]) == 0
    assert capsys.readouterr().out.startswith(f"verified 7 cases in {generated}: hashes match, 7 recomputed bitwise")
    target = generated / "full-softcap-0.npz"
    data = bytearray(target.read_bytes())
    data[-100] ^= 0x10
    target.write_bytes(bytes(data))
    assert main(["fixtures", "verify", str(generated)]) == 1
    assert "verification failed: case full-softcap-0: full-softcap-0.npz has sha256" in capsys.readouterr().err


def test_fixtures_check(generated, tmp_path, capsys):
    fixture_set = fixtures.load(generated)
    exported = tmp_path / "exported.npz"
    numpy.savez(exported, **{case.id: case.output.astype(numpy.float32) for case in fixture_set})
    assert main(["fixtures", "check", str(generated), str(exported)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["case", "array", "dtype", "max", "abs", "max", "rel", "atol", "rtol", "status"]
    assert "full-gqa-0" in out and out.rstrip().endswith("7 passed, 0 failed, 0 not exported")

    numpy.savez(exported, **{"full-gqa-0": fixture_set["full-gqa-0"].output + 0.02})
    assert main(["fixtures", "check", str(generated), str(exported)]) == 1
    out = capsys.readouterr().out
    assert "FAIL full-gqa-0 output:" in out and "1 failed, 6 not exported" in out
    assert main(["fixtures", "check", str(generated), str(exported), "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    assert main(["fixtures", "check", str(generated), str(exported), "--dtype", "bfloat16", "--require-all"]) == 1
    capsys.readouterr()
    assert main(["fixtures", "check", str(generated), str(exported), "--dtype", "int4"]) == 2
    assert "dtype must be one of" in capsys.readouterr().err
    numpy.savez(exported, **{"full-gqa-9": fixture_set["full-gqa-0"].output})
    assert main(["fixtures", "check", str(generated), str(exported)]) == 1
    assert "did you mean" in capsys.readouterr().err


def test_fixtures_verify_and_check_on_missing_folder(tmp_path, capsys):
    assert main(["fixtures", "verify", str(tmp_path / "absent")]) == 1
    assert "no such fixture folder" in capsys.readouterr().err
    assert main(["fixtures", "check", str(tmp_path), str(tmp_path / "x.npz")]) == 1
    assert "not a fixture set" in capsys.readouterr().err


def test_generate_fixtures_script_is_the_cli(tmp_path, monkeypatch, capsys):
    out = tmp_path / "script"
    monkeypatch.setattr(sys, "argv", ["generate_fixtures.py", "--out", str(out), "--mechanisms", "full",
                                      "--sizes", "tiny"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "generate_fixtures.py"), run_name="__main__")
    assert exit_info.value.code == 0 and "wrote 7 cases" in capsys.readouterr().out
    reference = tmp_path / "api"
    fixtures.generate(reference, ["full"], ["tiny"])
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
