#!/usr/bin/env bash
# One command for a CUDA machine with CuPy (and, for the timings, torch with CUDA):
#
#     bash scripts/gpu_check.sh [--lengths 8192,65536] [--no-install] [--no-tests] [--no-timing]
#
# 1. Installs reflex without touching the machine's torch or CuPy: `pip install --no-deps -e .`,
#    then only the pure dependencies (and test dependencies) that are missing, never upgrading one
#    that is present.
# 2. Runs `pytest -m gpu`: every registered case on CuPy against NumPy.
# 3. Times full, sliding_window and lsh on CuPy against torch SDPA on the same GPU at
#    L = 8,192 and 65,536 (scripts/gpu_timing.py).
#
# Without a usable GPU (no CuPy, no driver, no device, CUDA_VISIBLE_DEVICES="") it says so and
# exits 0, so it is safe to run anywhere. Otherwise its exit status is pytest's.
# PYTHON selects the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LENGTHS="8192,65536"
INSTALL=1 TESTS=1 TIMING=1
while [ $# -gt 0 ]; do
    case "$1" in
        --lengths) LENGTHS="$2"; shift 2 ;;
        --lengths=*) LENGTHS="${1#*=}"; shift ;;
        --no-install) INSTALL=0; shift ;;
        --no-tests) TESTS=0; shift ;;
        --no-timing) TIMING=0; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

# --- is there a GPU? ----------------------------------------------------------------------------
if ! GPU="$("$PYTHON" - <<'EOF' 2>&1
import sys
try:
    import cupy
except Exception as err:
    sys.exit(f"CuPy is not importable ({type(err).__name__}: {err})")
try:
    count = cupy.cuda.runtime.getDeviceCount()
except Exception as err:  # no driver, no device, CUDA_VISIBLE_DEVICES=""
    sys.exit(f"CuPy finds no CUDA device ({type(err).__name__}: {err})")
if count < 1:
    sys.exit("CuPy finds no CUDA device (0 devices)")
name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
print(f"{count} CUDA device(s), device 0: {name}; CuPy {cupy.__version__}")
EOF
)"; then
    echo "gpu_check: no GPU to check here: ${GPU##*$'\n'}. Nothing was installed or run."
    exit 0
fi
echo "gpu_check: $GPU"

# --- install without touching torch / CuPy ---------------------------------------------------------
# Offline machines: the build backend already present is used (no isolated build env to download),
# and whatever cannot be installed is reported; the tests and timings then run from this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$INSTALL" = 1 ]; then
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . \
        || "$PYTHON" -m pip install --quiet --no-deps -e . \
        || echo "gpu_check: could not install reflex (offline?); running from $PWD"
    MISSING="$("$PYTHON" - <<'EOF'
import importlib.metadata, re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = project["dependencies"] + project["optional-dependencies"]["test"]
for requirement in wanted:
    name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        print(requirement)
EOF
)"
    if [ -n "$MISSING" ]; then
        echo "gpu_check: installing the missing pure dependencies:" $MISSING
        mapfile -t REQUIREMENTS <<<"$MISSING"
        "$PYTHON" -m pip install --quiet "${REQUIREMENTS[@]}" \
            || echo "gpu_check: could not install them (offline?); tests that need them will fail or skip"
    fi
fi

# --- the GPU tests ---------------------------------------------------------------------------------
STATUS=0
if [ "$TESTS" = 1 ]; then
    echo "gpu_check: pytest -m gpu"
    "$PYTHON" -m pytest -q -m gpu -p no:randomly || STATUS=$?
fi

# --- timings -----------------------------------------------------------------------------------------
if [ "$TIMING" = 1 ]; then
    echo "gpu_check: timing full, sliding_window, lsh at L = $LENGTHS (reflex on CuPy vs torch SDPA on the GPU)"
    "$PYTHON" scripts/gpu_timing.py --lengths "$LENGTHS" || echo "gpu_check: the timing run failed (status $?)"
fi
exit "$STATUS"
