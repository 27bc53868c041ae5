#!/usr/bin/env bash
# CI: prove that bncpu compiles off x86. Cythonizes every .pyx (the sources setup.py
# generates from bncpu/_kernels/manifest.py included) and compiles each generated C file,
# and the C examples, to an aarch64 object with Debian's cross gcc, against the host's
# Python headers with an aarch64 pyconfig.h (both are LP64 Linux; only x86-only
# configuration macros are dropped). Nothing is linked or run. Works on a fresh Debian
# machine as root: installs gcc-aarch64-linux-gnu when missing, and Cython and NumPy in a
# temporary virtual environment when the current python lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CC_AARCH64=${CC_AARCH64:-aarch64-linux-gnu-gcc}

if ! command -v "$CC_AARCH64" >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu >/dev/null
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import Cython, numpy" >/dev/null 2>&1; then
    "$PYTHON" -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install -q cython numpy
    PYTHON="$WORK/venv/bin/python"
fi

# A copy of the sources, so that nothing generated lands in the checkout.
mkdir -p "$WORK/src"
cp -r "$ROOT/bncpu" "$ROOT/include" "$ROOT/examples" "$WORK/src/"
find "$WORK/src" \( -name '*.so' -o -name '*.c' -path '*/bncpu/*' -o -name '*_avx*.pyx' \) -delete
cd "$WORK/src"
"$PYTHON" bncpu/_kernels/manifest.py --sources
"$PYTHON" -m cython -3 --directive boundscheck=False,wraparound=False,cdivision=True,initializedcheck=False \
    -I include -I bncpu/_kernels bncpu/_threads.pyx bncpu/_capi.pyx bncpu/_ops.pyx \
    bncpu/_kernels/batch_norm.pyx bncpu/_kernels/row_norm.pyx

# The host's Python headers with an aarch64 pyconfig.h.
PY_INCLUDE=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
PY_CONFIG=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_config_h_filename())")
NP_INCLUDE=$("$PYTHON" -c "import numpy; print(numpy.get_include())")
mkdir -p "$WORK/pyinclude"
cp -r "$PY_INCLUDE/." "$WORK/pyinclude/"
# Debian's python3-dev pyconfig.h only picks a per-architecture file: use the x86-64 one.
if grep -q 'x86_64-linux-gnu/python' "$PY_CONFIG"; then
    PY_CONFIG=$(dirname "$PY_INCLUDE")/../include/x86_64-linux-gnu/$(basename "$PY_INCLUDE")/pyconfig.h
fi
grep -v -E 'HAVE_GCC_ASM_FOR_X87|HAVE_GCC_ASM_FOR_X64|HAVE_GCC_ASM_FOR_MC68881' "$PY_CONFIG" \
    > "$WORK/pyinclude/pyconfig.h"

FLAGS=(-c -O3 -fopenmp -fno-math-errno -ffp-contract=off -fPIC -Werror=incompatible-pointer-types
       -DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION -I "$WORK/pyinclude" -I "$NP_INCLUDE"
       -I include -I bncpu/_kernels)
status=0
for source in bncpu/_threads.c bncpu/_capi.c bncpu/_ops.c bncpu/_kernels/batch_norm.c \
              bncpu/_kernels/row_norm.c examples/c/bn_example.c examples/c/bn_extension.c; do
    if "$CC_AARCH64" "${FLAGS[@]}" "$source" -o "$WORK/$(basename "$source" .c).o"; then
        echo "aarch64: $source compiled"
    else
        echo "aarch64: $source FAILED" >&2
        status=1
    fi
done
exit $status
