"""The ``reflex`` command line: list, run, info, fixtures generate|verify|check; exit codes and hints."""

from __future__ import annotations

import importlib.util
import os
import runpy
import subprocess
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
    assert "implementation  tiled" in out and "checksum        sum " in out and "bits            sha256:" in out
    assert "options         implementation='tiled'" in out and "best of 1 after the warm-up" in out


def _line(out: str, label: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith(label + " ")]
    return line


def test_run_options(capsys):
    """--param (JSON), --causal, --kv-heads, --kv-seq (L ≠ S), --compute-dtype, --repeat, auto's choice."""
    assert main(["run", "full", "--seq", "8", "--heads", "4", "--dim", "4", "--kv-heads", "2", "--kv-seq", "11",
                 "--causal", "bottom_right", "--param", "scale=0.25", "--param", "softcap=30",
                 "--compute-dtype", "float32", "--repeat", "3"]) == 0
    out = capsys.readouterr().out
    assert _line(out, "inputs") == "inputs          q (1, 4, 8, 4), k (1, 2, 11, 4), v (1, 2, 11, 4)  (float64)"
    assert _line(out, "options") == ("options         scale=0.25, softcap=30, implementation='auto', "
                                     "causal='bottom_right', compute_dtype='float32'")
    assert "output          (1, 4, 8, 4) float32" in out
    assert _line(out, "implementation").startswith("implementation  auto → dense (L·S = 88;")
    assert "best of 3 after the warm-up; median" in out
    assert main(["run", "full", "--seq", "4097", "--kv-seq", "4097", "--heads", "1", "--dim", "1",
                 "--implementation", "auto"]) == 0
    assert "auto → tiled (L·S = 16,785,409;" in capsys.readouterr().out
    assert main(["run", "full", "--seq", "8", "--heads", "1", "--dim", "4", "--causal"]) == 0
    assert "causal=True" in capsys.readouterr().out


def test_run_param_values_are_json_or_words(capsys):
    assert main(["run", "rope", "--seq", "8", "--heads", "1", "--dim", "8", "--param", "convention=interleaved",
                 "--param", "rotary_dim=4"]) == 0
    assert "convention='interleaved'" in capsys.readouterr().out


def test_run_input_dtype(capsys):
    assert main(["run", "full", "--seq", "8", "--heads", "1", "--dim", "4", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "(float32)" in _line(out, "inputs") and "output          (1, 1, 8, 4) float64" in out
    assert main(["run", "full", "--seq", "8", "--dtype", "bfloat16"]) == 2
    assert "--dtype bfloat16 is not available on this backend" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run", "full", "--implementation", "tilde"], "reflex run full: implementation must be one of auto, dense, tiled; got 'tilde'"),
    (["run", "full", "--seq", "-5"], "reflex run: argument --seq: expected a positive integer; got -5"),
    (["run", "full", "--heads", "0"], "reflex run: argument --heads: expected a positive integer; got 0"),
    (["run", "full", "--seq", "x"], "reflex run: argument --seq: expected a positive integer; got 'x'"),
    (["run", "rope", "--dim", "63", "--seq", "8"], "reflex run rope: the head dim D of x must be even"),
    (["run", "full", "--seq", "8", "--heads", "4", "--kv-heads", "3"], "reflex run full: k has 3 heads; q has 4"),
    (["run", "full", "--seq", "8", "--param", "window=3"], "reflex run full: full has no option 'window'; its options: mask,"),
    (["run", "full", "--seq", "8", "--param", "scale"], "reflex run full: --param expects NAME=VALUE; got 'scale'"),
    (["run", "full", "--seq", "8", "--causal", "bottom_left"], "reflex run: argument --causal: invalid choice: 'bottom_left'"),
    (["run", "axial", "--seq", "8", "--causal"], "reflex run axial: axial has no causal option"),
    (["run", "full", "--seq", "8", "--param", "softcap=-1"], "reflex run full: softcap must be"),
    (["run", "full", "--seq", "8", "--param", "scale=1e308"], "reflex run full: full_attention: the output is not finite"),
])
def test_run_usage_errors_are_one_line(argv, message, capsys):
    """A user's mistake: one line on stderr naming it, exit code 2, no traceback."""
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert "Traceback" not in err


def _cli(*args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reflex", *args], cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=120)


def test_python_dash_m_reflex_and_version():
    done = _cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"reflex {reflex.__version__}"
    done = _cli("run", "full", "--seq", "-5")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_broken_pipe_is_one_line():
    """`reflex info full | head -1`: the reader leaves early; no BrokenPipeError traceback. The read
    end is closed before reflex writes, so the first write fails whatever the pipe's buffer size."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        writer = subprocess.run([sys.executable, "-m", "reflex", "info", "full"], cwd=ROOT, stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert writer.returncode == 2, writer.stderr
    assert writer.stderr == "reflex: output closed before it was all written (broken pipe)\n"


@pytest.mark.parametrize("key", [m.key for m in reflex.list_mechanisms()])
def test_run_every_mechanism(key, capsys):
    """Every registered mechanism runs from the command line with no options beyond the sizes."""
    assert main(["run", key, "--seq", "16", "--heads", "2", "--dim", "8"]) == 0
    out = capsys.readouterr().out
    assert f"mechanism       {key}\n" in out
    checksum = _line(out, "checksum").split()
    assert numpy.isfinite(float(checksum[2])) and numpy.isfinite(float(checksum[4]))


@pytest.mark.parametrize("key", ["full", "sliding_window"])
def test_run_same_checksum_on_every_backend(key, capsys):
    """The checksum is taken from the host float64 values (sums to 12 digits), so NumPy, array-api-strict
    and torch runs print the same line although their float64 bits differ (BLAS summation order)."""
    backends = ["numpy", "array_api_strict"] + (["torch"] if importlib.util.find_spec("torch") else [])
    sums = []
    for backend in backends:
        assert main(["run", key, "--seq", "64", "--heads", "2", "--dim", "8", "--backend", backend]) == 0
        sums.append(_line(capsys.readouterr().out, "checksum"))
    assert sums == [sums[0]] * len(backends)


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


FULL_TINY = len(reflex.get("full").cases("tiny", 2))  # full's registered cases at size tiny


@pytest.fixture
def generated(tmp_path, capsys) -> Path:
    folder = tmp_path / "set"
    assert main(["fixtures", "generate", "--out", str(folder), "--mechanisms", "full", "--sizes", "tiny",
                 "--seed", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"wrote {FULL_TINY} cases of 1 mechanism(s) (sizes tiny, seed 2) to {folder}: ")
    assert "100%" not in captured.err  # a tqdm bar only when stderr is a terminal (tests/test_fixtures_cli.py)
    return folder


def test_fixtures_generate_and_verify(generated, capsys):
    assert fixtures.load(generated).manifest["seed"] == 2
    assert main(["fixtures", "verify", str(generated)]) == 0
    assert capsys.readouterr().out.startswith(f"verified {FULL_TINY} cases in {generated}: hashes match, {FULL_TINY} recomputed bitwise")
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
    assert out.splitlines()[0].startswith("rule: |err| ≤ atol + rtol·|ref| per element")
    assert out.splitlines()[1].split() == ["case", "array", "dtype", "max", "abs", "err/bound", "atol", "rtol", "status"]
    assert "full-gqa-0" in out and out.rstrip().endswith(f"{FULL_TINY} passed, 0 failed, 0 not exported")

    numpy.savez(exported, **{"full-gqa-0": fixture_set["full-gqa-0"].output + 0.02})
    assert main(["fixtures", "check", str(generated), str(exported)]) == 1
    out = capsys.readouterr().out
    assert "FAIL full-gqa-0 output:" in out and f"1 failed, {FULL_TINY - 1} not exported" in out
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
    assert exit_info.value.code == 0 and f"wrote {len(reflex.get('full').cases('tiny', 0))} cases" in capsys.readouterr().out
    reference = tmp_path / "api"
    fixtures.generate(reference, ["full"], ["tiny"])
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
