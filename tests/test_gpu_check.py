"""scripts/gpu_check.sh without a GPU (it says so and exits 0) and scripts/gpu_timing.py on the CPU.

The GPU itself is detected through CuPy; a stand-in ``cupy`` package on PYTHONPATH plays a machine
without CuPy, one whose driver finds no device, and one with a device (detection only: the
install, tests and timings are switched off there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

FAKE_CUPY = {
    "absent": "raise ImportError('No module named cupy (stand-in)')\n",
    "no_device": ("__version__ = '0.0'\nclass _Runtime:\n    @staticmethod\n    def getDeviceCount():\n"
                  "        raise RuntimeError('cudaErrorNoDevice: no CUDA-capable device is detected')\n"
                  "class cuda:\n    runtime = _Runtime\n"),
    "one_device": ("__version__ = '0.0'\nclass _Runtime:\n    @staticmethod\n    def getDeviceCount():\n        return 1\n"
                   "    @staticmethod\n    def getDeviceProperties(i):\n        return {'name': b'Stand-in GPU'}\n"
                   "class cuda:\n    runtime = _Runtime\n"),
}


def _run(tmp_path: Path, cupy: str, *args: str) -> subprocess.CompletedProcess:
    package = tmp_path / "site" / "cupy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_CUPY[cupy])
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("cupy, reason", [("absent", "CuPy is not importable"),
                                          ("no_device", "CuPy finds no CUDA device (RuntimeError: cudaErrorNoDevice")])
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path, cupy, reason):
    done = _run(tmp_path, cupy)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"gpu_check: no GPU to check here: {reason}")
    assert "Nothing was installed or run." in done.stdout and "pytest" not in done.stdout


def test_with_a_gpu_it_goes_on(tmp_path):
    done = _run(tmp_path, "one_device", "--no-install", "--no-tests", "--no-timing")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "gpu_check: 1 CUDA device(s), device 0: Stand-in GPU; CuPy 0.0\n"


def test_unknown_option_exits_2(tmp_path):
    done = _run(tmp_path, "absent", "--lenghts", "8")
    assert done.returncode == 2 and "unknown option --lenghts" in done.stderr


def test_timing_script_on_the_cpu():
    """The timing table's code path, with NumPy for CuPy and torch on the CPU (skipped columns without torch)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_timing.py"), "--library", "numpy",
                           "--torch-device", "cpu", "--lengths", "64", "--repeat", "1", "--heads", "1",
                           "--mechanisms", "full,sliding_window"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[3:]]
    assert [row[:2] for row in rows] == [["full", "64"], ["sliding_window", "64"]]
    assert all(row[2:4] == [row[2], "s"] and float(row[2]) >= 0 for row in rows)
